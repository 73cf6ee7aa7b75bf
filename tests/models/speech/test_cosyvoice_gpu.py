# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""CosyVoice2/3 decoders on a GPU: streaming sessions served by the API
server's decode worker share batched rounds (the session's tokens arrive as
Python ints on the CPU while the flow, the prompt and the speaker embedding
live on the GPU), with no batch falling back to one chunk at a time, and
give the audio of each session decoded alone; and the LMs give the same
seeded RAS tokens with async scheduling (their default) as without.

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

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"
)
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
        extra={
            "prompt_feat": spk["prompt_speech_feat"].numpy(),
            "embedding": spk["flow_embedding"].numpy(),
        },
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
    monkeypatch.setattr(
        t2w_mod, "_alone", lambda m, j: fallbacks.append(j) or inner(m, j)
    )
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
            parts += [c async for c in worker.stream(s, t[i : i + 30])]
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


@pytest.mark.parametrize("kind", ["cosyvoice2", "cosyvoice3"])
def test_lm_async_scheduling_equals_sync(kind, tmp_path):
    """The LM's RAS sampler reads the runner's history window; under async
    scheduling (the default) its last frame comes from the device. Seeded
    RAS sampling of a batch must give the tokens of sync scheduling."""
    from vllm import LLM
    from vllm.config.text_to_speech import TextToSpeechParams
    from vllm.inputs import TokensPrompt

    if kind == "cosyvoice2":
        from make_cosyvoice2_checkpoint import make_release_dir
    else:
        from make_cosyvoice3_checkpoint import make_release_dir
    out = tmp_path / kind
    make_release_dir(out, "tiny", seed=0)
    torch.backends.cuda.matmul.allow_tf32 = False
    texts = ["The quick brown fox.", "Jumps over the lazy dog, twice.", "Hello."]
    results = {}
    for async_ in (True, False):
        llm = LLM(
            model=str(out),
            dtype="float32",
            max_model_len=1024,
            max_num_seqs=4,
            gpu_memory_utilization=0.2,
            async_scheduling=async_,
        )
        try:
            assert (
                llm.llm_engine.vllm_config.scheduler_config.async_scheduling is async_
            )
            from vllm.model_executor.model_loader import get_model_cls

            model_cls = get_model_cls(llm.llm_engine.model_config)
            prompts, params = [], []
            for i, text in enumerate(texts):
                p = TextToSpeechParams(
                    text=text,
                    model_config=llm.llm_engine.model_config,
                    voice=None,
                    speaker=None,
                    extra={},
                )
                prompts.append(
                    TokensPrompt(**model_cls.get_speech_generation_prompt(p))
                )
                params.append(
                    model_cls.get_speech_sampling_params(
                        p,
                        {
                            "temperature": 1.0,
                            "top_p": 0.8,
                            "top_k": 25,
                            "seed": 7 + i,
                            "max_tokens": 200,
                        },
                    )
                )
            outs = llm.generate(prompts, params, use_tqdm=False)
            results[async_] = [list(o.outputs[0].token_ids) for o in outs]
        finally:
            del llm
    assert results[True] == results[False]
    assert all(len(t) > 5 for t in results[True])
