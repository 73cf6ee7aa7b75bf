# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The decode-attention Triton kernel of the Fish fast loop against the op
path it replaces (q/k RMSNorm, RoPE, cache writes, SDPA), on the CPU.

As in test_speech_sampler.py the kernel runs through Triton's interpreter
in one child process (``speech_fast_attention_cases.py``); on a GPU machine
``test_fish_speech_gpu.py`` runs the engine with the compiled kernel.
"""

from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("vllm._C")

from vllm.model_executor.layers import speech_fast_attention as sfa  # noqa: E402

from .triton_cases import run_interpreted_cases  # noqa: E402

CASES = Path(__file__).with_name("speech_fast_attention_cases.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("attention") / "results.pt"
    return run_interpreted_cases(CASES, out)


def _tol(t):
    return (1e-5, 1e-5) if t.dtype == torch.float32 else (2e-2, 2e-2)


def test_kernel_equals_op_path(results):
    cases = [n for n in results if not n.startswith("loop")]
    assert len(cases) == 6
    for name in cases:
        r = results[name]
        rtol, atol = _tol(r["got"])
        assert r["got"].dtype == r["want"].dtype, name
        torch.testing.assert_close(
            r["got"], r["want"], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )
        # the new position is written, the rest of the cache is untouched
        torch.testing.assert_close(r["k"], r["want_k"], rtol=rtol, atol=atol)
        assert torch.equal(r["v"], r["want_v"]), name


@pytest.mark.parametrize("version", ["s1", "s2"])
def test_fast_loop_with_kernel(results, version):
    r = results[f"loop-{version}"]
    torch.testing.assert_close(r["got"], r["want"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r["got_cache"], r["want_cache"], rtol=1e-4, atol=1e-4)
    assert torch.equal(r["got_codes"], r["want_codes"])


def test_rejects_what_it_cannot_run():
    q, k = torch.zeros(2, 64), torch.zeros(2, 32)
    cache = torch.zeros(2, 2, 8, 16)
    cs = torch.zeros(8, 16)
    with pytest.raises(ValueError, match="outside"):
        sfa.decode_attention(q, k, k, cache, cache.clone(), 8, cs, 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        sfa.decode_attention(torch.zeros(2, 60), k, k, cache, cache.clone(), 1, cs, 1.0)
    with pytest.raises(ValueError, match="power of 2"):
        c12 = torch.zeros(2, 2, 8, 12)
        sfa.decode_attention(
            torch.zeros(2, 48),
            torch.zeros(2, 24),
            torch.zeros(2, 24),
            c12,
            c12.clone(),
            1,
            cs,
            1.0,
        )
    with pytest.raises(ValueError, match="both"):
        sfa.decode_attention(
            q, k, k, cache, cache.clone(), 1, cs, 1.0, q_norm=torch.ones(16)
        )
    empty = torch.zeros(0, 2, 8, 16)
    out = sfa.decode_attention(
        torch.zeros(0, 64),
        torch.zeros(0, 32),
        torch.zeros(0, 32),
        empty,
        empty.clone(),
        1,
        cs,
        1.0,
    )
    assert out.shape == (0, 64)
    assert not sfa.decode_attention_available(torch.device("cpu"))
