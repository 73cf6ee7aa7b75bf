# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Parity of the CosyVoice3 audio stack (DiT flow, causal HiFT, the
``CosyVoice3Model`` token2wav offline and streaming) with the original.

Oracle: ``fixtures/cosyvoice3_audio/cosyvoice3_audio.pt``, made by
``make_fixture.py`` there from the ORIGINAL code (FunAudioLLM/CosyVoice at
ace7c47; no PyPI package has the CosyVoice3 classes) on the tiny random
``flow.pt`` / ``hift.pt`` of ``tools/cosyvoice3_audio_weights.py`` (seed 0),
which the original loaded with ``strict=True``. Here the same files are
written again (they must match the fixture's record of them, within float
rounding), loaded by
``CosyVoice3Token2Wav.from_pretrained`` and compared in fp32 on CPU.
"""

import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(os.path.realpath(__file__)).parents[3]
sys.path.insert(0, str(REPO / "tools"))

import cosyvoice3_audio_weights as weights  # noqa: E402

from vllm.model_executor.models.cosyvoice3_flow import (  # noqa: E402
    CausalMaskedDiffWithDiT,
    CosyVoice3FlowConfig,
)
from vllm.model_executor.models.cosyvoice_hift import (  # noqa: E402
    CausalHiFTGenerator,
)
from vllm.model_executor.models.cosyvoice_token2wav import (  # noqa: E402
    CosyVoice2Token2Wav,
    CosyVoice3Token2Wav,
    push_streams,
)

FIXTURE = REPO / "tests/models/speech/fixtures/cosyvoice3_audio/cosyvoice3_audio.pt"
ATOL = 1e-3


def close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, (tuple(ours.shape), tuple(ref.shape))
    err = (ours.double() - ref.double()).abs().max().item()
    assert err < ATOL, f"max abs error {err} (ref max {ref.abs().max().item()})"


@pytest.fixture(scope="module")
def fx() -> dict:
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cv3_tiny")
    weights.write_cv3_flow_hift(d, "tiny", 0)
    (d / "cosyvoice3.yaml").write_text(weights.cv3_audio_yaml("tiny"))
    return d


@pytest.fixture(scope="module")
def t2w(release_dir) -> CosyVoice3Token2Wav:
    return CosyVoice3Token2Wav.from_pretrained(str(release_dir))


def no_prompt() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(1, 0, dtype=torch.int32), torch.zeros(1, 0, 80)


def test_weights_are_the_fixtures(fx, release_dir):
    """Key names, shapes, dtypes and per-tensor sums / norm / projection /
    samples within rel 1e-5 of the fixture's ``state_digest``: not a sha256
    of the files, whose float32 values may differ in the last bit between
    CPUs (vector ISA, BLAS code path)."""
    assert set(fx["weights"]) == {"flow.pt", "hift.pt"}
    for name, want in fx["weights"].items():
        state = torch.load(release_dir / name, weights_only=True)
        bad = weights.digest_mismatches(state, want, rtol=1e-5)
        assert not bad, (
            f"{name} written by tools/cosyvoice3_audio_weights.py differs from "
            "the one the fixture was made with; re-run make_fixture.py\n"
            + "\n".join(bad[:10])
            + (f"\n... {len(bad) - 10} more" if len(bad) > 10 else "")
        )


def test_fixed_excitation_noise(fx, t2w):
    """The causal HiFT's noise reproduces the original's draws at release
    load (the flow's CFM seeds 0, then the flow and F0 predictor init)."""
    ref = fx["hift_noise"]
    close(t2w.hift.rand_ini, ref["rand_ini"])
    head = ref["sine_waves_head"]
    assert torch.equal(t2w.hift.fixed_noise(head.shape[1], torch.device("cpu")), head)


@pytest.mark.parametrize(
    "case, n, streaming, finalize",
    [
        ("flow_oneshot", 16, False, True),
        ("flow_chunk", 30, True, False),
        ("flow_stream_final", 30, True, True),
    ],
)
def test_flow(fx, t2w, case, n, streaming, finalize):
    mel = t2w.flow(
        fx["tokens"][:, :n],
        fx["prompt_token"],
        fx["prompt_feat"],
        fx["embedding"],
        streaming=streaming,
        finalize=finalize,
    )
    close(mel, fx[case])


def test_flow_chunk_mask_matters(fx, t2w):
    """The streaming chunk mask changes the result (so the parity above
    checks it)."""
    args = (
        fx["tokens"][:, :30],
        fx["prompt_token"],
        fx["prompt_feat"],
        fx["embedding"],
    )
    a = t2w.flow(*args, streaming=True)
    b = t2w.flow(*args, streaming=False)
    assert (a - b).abs().max() > 10 * ATOL


def test_hift_non_final_chunk(fx, t2w):
    wav, _ = t2w.hift(fx["flow_oneshot"][:, :, :20], finalize=False)
    close(wav, fx["hift_chunk"])


def test_offline(fx, t2w):
    wav = t2w.synthesize(
        fx["tokens"][:, :16], fx["prompt_token"], fx["prompt_feat"], fx["embedding"]
    )
    close(wav, fx["tts_oneshot"][0])


def test_offline_speed(fx, t2w):
    wav = t2w.synthesize(fx["tokens"][:, :8], *no_prompt(), fx["embedding"], speed=1.5)
    close(wav, fx["tts_speed"][0])


def test_stream_release_hop(fx, t2w):
    s = t2w.stream(*no_prompt(), fx["embedding"])
    chunks = s.push(fx["tokens"][0, :30].tolist()) + s.finish()
    ref = fx["tts_stream_release"]
    assert [c.shape[1] for c in chunks] == [c.shape[1] for c in ref]
    for ours, want in zip(chunks, ref):
        close(ours, want)
    assert s.finished
    with pytest.raises(RuntimeError):
        s.push([1])


def test_stream_hop_growth_with_prompt(fx, t2w):
    """Hop 5 (+ prompt padding) -> 10 -> 20 -> 20, tokens pushed one by one."""
    model = CosyVoice3Token2Wav(
        t2w.flow, t2w.hift, token_hop_len=5, token_max_hop_len=20
    )
    s = model.stream(fx["prompt_token"], fx["prompt_feat"], fx["embedding"])
    chunks = []
    for t in fx["tokens"][0, :44].tolist():
        chunks += s.push([t])
    chunks += s.finish()
    ref = fx["tts_stream_small_hop"]
    assert [c.shape[1] for c in chunks] == [c.shape[1] for c in ref]
    for ours, want in zip(chunks, ref):
        close(ours, want)


def test_synthesize_batch(fx, t2w):
    toks = [fx["tokens"][:, :16], fx["tokens"][:, :8]]
    prompts = [(fx["prompt_token"], fx["prompt_feat"]), no_prompt()]
    wavs = t2w.synthesize_batch(
        toks,
        [p[0] for p in prompts],
        [p[1] for p in prompts],
        torch.cat([fx["embedding"], fx["embedding"]]),
    )
    close(wavs[0], fx["tts_oneshot"][0])
    alone = t2w.synthesize(toks[1], *prompts[1], fx["embedding"])
    close(wavs[1], alone)


def _copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "name, key",
    [
        ("flow.pt", "decoder.estimator.rotary_embed.inv_freq"),
        ("hift.pt", "f0_predictor.classifier.weight"),
    ],
)
def test_missing_key_is_a_clear_error(release_dir, tmp_path, name, key):
    d = _copy_dir(release_dir, tmp_path / "broken")
    state = torch.load(d / name, weights_only=True)
    del state[key]
    torch.save(state, d / name)
    with pytest.raises(ValueError, match=rf"{name}.*missing keys: .*{key}"):
        CosyVoice3Token2Wav.from_pretrained(str(d))


def test_wrong_release_is_a_clear_error(release_dir, tmp_path):
    with pytest.raises(ValueError, match="CosyVoice3Token2Wav"):
        CosyVoice2Token2Wav.from_pretrained(str(release_dir))
    d = _copy_dir(release_dir, tmp_path / "cv2flow")
    y = d / "cosyvoice3.yaml"
    y.write_text(
        y.read_text().replace(
            "cosyvoice.flow.flow.CausalMaskedDiffWithDiT",
            "cosyvoice.flow.flow.CausalMaskedDiffWithXvec",
        )
    )
    with pytest.raises(ValueError, match="CausalMaskedDiffWithXvec"):
        CosyVoice3Token2Wav.from_pretrained(str(d))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "cosyvoice3.yaml").write_text(weights.cv3_audio_yaml("tiny"))
    with pytest.raises(FileNotFoundError, match="flow.pt"):
        CosyVoice3Token2Wav.from_pretrained(str(empty))


def test_bad_inputs(fx, t2w):
    pt, pf, emb = fx["prompt_token"], fx["prompt_feat"], fx["embedding"]
    with pytest.raises(ValueError, match="out of range"):
        t2w.flow(torch.tensor([[5, 300]]), pt, pf, emb)
    with pytest.raises(ValueError, match="192 dims"):
        t2w.flow(fx["tokens"][:, :8], pt, pf, emb[:, :100])
    with pytest.raises(ValueError, match="look-ahead"):
        t2w.flow(fx["tokens"][:, :2], *no_prompt(), emb, finalize=False)
    with pytest.raises(ValueError, match="longer than"):
        t2w.flow(fx["tokens"][:, :2], pt[:, :1], pf, emb)
    with pytest.raises(ValueError, match="non-final chunk"):
        t2w.hift(fx["flow_oneshot"][:, :, :7], finalize=False)
    with pytest.raises(ValueError, match="offline"):
        t2w.token2wav(fx["tokens"][:, :30], pt, pf, emb, finalize=False, speed=1.2)


def test_yaml_sections():
    """The "real" yaml has the release dims; tiny and real build the same
    key set (shapes checked on the meta device, no real-size weights)."""
    flow_cfg, hift_cfg = weights._configs("real")
    assert flow_cfg == CosyVoice3FlowConfig()
    est = flow_cfg.estimator
    assert (est.dim, est.depth, est.heads, est.dim_head, est.ff_mult) == (
        1024,
        22,
        16,
        64,
        2,
    )
    assert est.static_chunk_size == 50 and flow_cfg.inference_cfg_rate == 0.7
    assert hift_cfg.conv_pre_look_right == 4 and hift_cfg.base_channels == 512
    with torch.device("meta"):
        flow = CausalMaskedDiffWithDiT(flow_cfg)
        hift = CausalHiFTGenerator(hift_cfg, noise_rng=torch.Generator())
    fs, hs = flow.state_dict(), hift.state_dict()
    assert fs["input_embedding.weight"].shape == (6561, 80)
    assert fs["pre_lookahead_layer.conv1.weight"].shape == (1024, 80, 4)
    assert fs["pre_lookahead_layer.conv2.weight"].shape == (80, 1024, 3)
    assert fs["decoder.estimator.input_embed.proj.weight"].shape == (1024, 320)
    assert fs["decoder.estimator.rotary_embed.inv_freq"].shape == (32,)
    assert fs["decoder.estimator.transformer_blocks.21.ff.ff.0.0.weight"].shape == (
        2048,
        1024,
    )
    assert hs["conv_pre.parametrizations.weight.original1"].shape == (512, 80, 5)
    assert hs["f0_predictor.condnet.0.parametrizations.weight.original1"].shape == (
        512,
        80,
        4,
    )
    tiny_flow, tiny_hift = weights.build_cv3_audio_modules("tiny", 0)

    def blocks(keys) -> set[str]:  # the DiT depth differs
        return {
            re.sub(r"transformer_blocks\.\d+\.", "transformer_blocks.N.", k)
            for k in keys
        }

    assert blocks(fs) == blocks(tiny_flow.state_dict())
    assert set(hs) == set(tiny_hift.state_dict())


def test_push_streams_batches_sessions(fx, t2w):
    """Three sessions streamed together (batched flow, batched causal HiFT
    where the mel lengths agree) give what each gives alone."""
    prompt = (fx["prompt_token"], fx["prompt_feat"])
    toks = fx["tokens"][0, :30].tolist()
    setups = [(no_prompt(), toks), (no_prompt(), toks[::-1]), (prompt, toks)]

    def sessions():
        return [t2w.stream(*p, fx["embedding"]) for p, _ in setups]

    alone = []
    for s, (_, t) in zip(sessions(), setups):
        alone.append(s.push(t[:14]) + s.push(t[14:]) + s.finish())
    sizes: list[int] = []
    inner = t2w.token2wav_batch
    t2w.token2wav_batch = lambda jobs: sizes.append(len(jobs)) or inner(jobs)
    try:
        streams = sessions()
        together = [[] for _ in streams]
        for part in (slice(0, 14), slice(14, None)):
            outs = push_streams(streams, [t[part] for _, t in setups], [False] * 3)
            for g, o in zip(together, outs):
                g += o
        for g, o in zip(together, push_streams(streams, [[]] * 3, [True] * 3)):
            g += o
    finally:
        del t2w.token2wav_batch
    assert max(sizes) == 3, sizes
    for a, b in zip(together, alone):
        assert [c.shape for c in a] == [c.shape for c in b]
        for x, y in zip(a, b):
            close(x, y)
    # the first session is the release-hop fixture
    ref = fx["tts_stream_release"]
    assert [c.shape[1] for c in together[0]] == [c.shape[1] for c in ref]
    for ours, want in zip(together[0], ref):
        close(ours, want)
