# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""CosyVoice2/3 decoders on a GPU: streaming sessions served by the API
server's decode worker share batched rounds (the session's tokens arrive as
Python ints on the CPU while the flow, the prompt and the speaker embedding
live on the GPU), with no batch falling back to one chunk at a time, and
give the audio of each session decoded alone.

Skipped without CUDA (CI is CPU-only); run on the GPU machine with
``pytest tests/models/speech/test_cosyvoice_gpu.py``.
"""

import asyncio
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU")
# The test process touches CUDA: engine cores must be spawned, not forked.
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

TOOLS = Path(os.path.realpath(__file__)).parents[3] / "tools"
sys.path.insert(0, str(TOOLS))


def _decoder(kind: str, out: Path):
    from vllm.config.text_to_speech import VoicePrompt

    if kind == "cosyvoice2":
        from make_cosyvoice2_checkpoint import make_release_dir

        from vllm.model_executor.models.cosyvoice2 import (
            CosyVoice2SpeechDecoder as Decoder,
        )
    else:
        from make_cosyvoice3_checkpoint import make_release_dir

        from vllm.model_executor.models.cosyvoice3 import (
            CosyVoice3SpeechDecoder as Decoder,
        )
    make_release_dir(out, "tiny", seed=0)
    spk = torch.load(out / "spk2info.pt", weights_only=True)["spk_a"]
    voice = VoicePrompt(
        ref_text="",
        codes=spk["flow_prompt_speech_token"].numpy(),
        extra={"prompt_feat": spk["prompt_speech_feat"].numpy(),
               "embedding": spk["flow_embedding"].numpy()},
    )
    return Decoder(str(out), torch.device("cuda")), voice


@pytest.mark.parametrize("kind", ["cosyvoice2", "cosyvoice3"])
def test_decode_worker_rounds_on_gpu(kind, tmp_path, monkeypatch):
    from vllm.entrypoints.text_to_speech.serving import DecodeWorker
    from vllm.model_executor.models import cosyvoice_token2wav as t2w_mod

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    decoder, voice = _decoder(kind, tmp_path / kind)
    fallbacks: list = []
    inner = t2w_mod._alone
    monkeypatch.setattr(t2w_mod, "_alone",
                        lambda m, j: fallbacks.append(j) or inner(m, j))
    sizes: list[int] = []
    batch = decoder.t2w.token2wav_batch
    decoder.t2w.token2wav_batch = lambda jobs: sizes.append(len(jobs)) or batch(jobs)

    vocab = int(decoder.t2w.flow.input_embedding.num_embeddings)
    g = np.random.default_rng(0)
    toks = [g.integers(0, vocab, n) for n in (120, 120, 90)]

    def alone(t: np.ndarray) -> np.ndarray:
        s = decoder.open_stream(voice)
        return np.concatenate([s.decode(t), s.finish()])

    want = [alone(t) for t in toks]
    worker = DecodeWorker(decoder)

    async def one(t: np.ndarray) -> np.ndarray:
        s = await worker.call(lambda: decoder.open_stream(voice))
        parts = []
        for i in range(0, len(t), 30):
            parts += [c async for c in worker.stream(s, t[i:i + 30])]
        parts += [c async for c in worker.stream(s, None)]
        return np.concatenate(parts)

    async def run():
        return await asyncio.gather(*[one(t) for t in toks])

    sizes.clear()
    got = asyncio.run(run())
    del decoder.t2w.token2wav_batch
    assert not fallbacks, "a batched round failed and was redone chunk by chunk"
    assert max(sizes) == 3, sizes
    for a, b in zip(got, want):
        assert a.shape == b.shape
        err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-9)
        assert err < 1e-3, err
