# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The fused Triton sampler of the Fish fast loop against its torch reference.

The kernel runs on the CPU through Triton's interpreter: ``TRITON_INTERPRET=1``
has to be set before triton is imported, so the cases run in one child
process (``speech_sampler_cases.py``) and come back as tensors; on a GPU
machine ``test_fish_speech_gpu.py`` runs the compiled kernel. The draws use
the same Exp(1) noise as the reference, so the sampled ids must be
identical, row by row.
"""

from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from vllm.model_executor.layers import speech_sampler  # noqa: E402

from .triton_cases import run_interpreted_cases  # noqa: E402

CASES = Path(__file__).with_name("speech_sampler_cases.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sampler") / "results.pt"
    return run_interpreted_cases(CASES, out)


@pytest.mark.parametrize("case", ["fish-1024-bf16", "fish-300-fp32", "fish-300-bf16"])
def test_fish_rows_match_reference(results, case):
    r = results[case]
    assert r["got"].dtype == torch.int64
    assert torch.equal(r["got"], r["want"])
    # the draw depends on the noise: another noise gives other ids
    greedy = r["greedy"]
    assert not torch.equal(r["other"][~greedy], r["got"][~greedy])
    assert torch.equal(r["other"][greedy], r["got"][greedy])


def test_s2_rows_match_reference(results):
    r = results["s2-512-bf16"]
    assert torch.equal(r["got"], r["want"])


def test_greedy_and_strided_logits(results):
    r = results["strided"]
    assert torch.equal(r["greedy_got"], r["want"])
    assert torch.equal(r["tiny_top_p_got"], r["want"])


def test_rejects_what_it_cannot_sample():
    ones = torch.ones(2)
    no = torch.zeros(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="8192"):
        speech_sampler.fused_sample(
            torch.zeros(2, 9000), no, ones, ones, torch.ones(2, 9000)
        )
    with pytest.raises(ValueError, match="penalty"):
        speech_sampler.fused_sample(
            torch.zeros(2, 8),
            no,
            ones,
            ones,
            torch.ones(2, 8),
            prev=torch.zeros(2, 1, dtype=torch.long),
        )
    assert not speech_sampler.fused_sample_available(torch.device("cpu"))
