# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Fish Speech on a GPU: the CUDA-graph fast loop and the semantic-only slow
head against their eager / full-vocabulary reference paths.

Skipped without CUDA (CI is CPU-only); run on the GPU machine with
``pytest tests/models/speech/test_fish_speech_gpu.py``.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"
)
# The test process touches CUDA: engine cores must be spawned, not forked.
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

TOOLS = Path(os.path.realpath(__file__)).parents[3] / "tools"
sys.path.insert(0, str(TOOLS))

STEPS = 48


@pytest.fixture(scope="module")
def s1_dir(tmp_path_factory):
    from make_fish_checkpoint import make_s1

    out = tmp_path_factory.mktemp("fish") / "s1"
    make_s1(
        out, seed=0, dtype=torch.float32, dims={"num_codebooks": 10}, codebook_size=4096
    )
    return out


def _generate(path, seeds, probe=None, **llm_kw):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    torch.backends.cuda.matmul.allow_tf32 = False
    llm = LLM(
        model=str(path),
        dtype="float32",
        max_model_len=512,
        gpu_memory_utilization=0.3,
        max_num_seqs=16,
        **llm_kw,
    )
    try:
        if probe is not None:
            assert all(llm.apply_model(probe)), "the model did not take the path"
        prompts = [
            TokensPrompt(prompt_token_ids=[271 + 11, 104, 101, 108, 108, 111, 32 + i])
            for i in range(len(seeds))
        ]
        params = [
            SamplingParams(
                temperature=0.0 if s is None else 0.8,
                top_p=0.8,
                repetition_penalty=1.2,
                max_tokens=STEPS,
                ignore_eos=True,
                seed=s,
                detokenize=False,
            )
            for s in seeds
        ]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [
            (list(o.outputs[0].token_ids), o.outputs[0].aux_token_ids.tolist())
            for o in outs
        ]
    finally:
        del llm


def test_graph_fast_loop_equals_eager(s1_dir):
    """Greedy rows in a batch: the replayed CUDA graphs (and vLLM's own
    graphs of the slow model) give the eager loop's codes."""
    seeds = [None] * 5
    graphs = _generate(s1_dir, seeds)
    eager = _generate(s1_dir, seeds, enforce_eager=True)
    assert graphs == eager


def test_seeded_rows_fall_back_to_eager(s1_dir):
    seeds = [None, 3, None, 5]
    a = _generate(s1_dir, seeds)
    b = _generate(s1_dir, seeds, enforce_eager=True)
    # greedy rows identical; seeded rows reproducible across both paths
    assert a == b


def _torch_flags(model):
    return not (
        model.fused_fast_block
        or model.fused_fast_sampler
        or any(layer.attention.decode_kernel for layer in model.fast_layers)
    )


def _fused_flags(model):
    return (
        model.fused_fast_block
        and model.fused_fast_sampler
        and all(layer.attention.decode_kernel for layer in model.fast_layers)
    )


def test_fused_fast_kernels_equal_torch_paths(s1_dir, monkeypatch):
    """fused_fast_block + fused_fast_sampler (on by default on CUDA: the fast
    layers on vLLM's CUDA ops with the Triton decode attention, one Triton
    sampler launch per codebook) against both off, fp32: the
    codes of the torch paths, for greedy rows (CUDA graphs) and seeded rows
    (eager, the same noise draws from the same generators)."""
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    seeds = [None, 3, None, 5, None]
    # the slow model uncompiled (both engines): start-up in seconds, and the
    # fast loop is not part of vLLM's compiled graph either way
    eager_slow = {"compilation_config": {"mode": 0}}
    fused = _generate(s1_dir, seeds, probe=_fused_flags, **eager_slow)
    plain = _generate(
        s1_dir,
        seeds,
        probe=_torch_flags,
        hf_overrides={"fused_fast_block": False, "fused_fast_sampler": False},
        **eager_slow,
    )
    assert fused == plain


def test_fused_sampler_matches_torch_on_gpu():
    """The compiled Triton sampler against the torch reference on CUDA tensors
    (whose sort of rows longer than 32 is stable, the tie order the kernel
    implements), bf16-rounded logits (many ties), the same noise."""
    import vllm.model_executor.models.fish_speech as fish
    from vllm.model_executor.layers.speech_sampler import fused_sample

    g = torch.Generator(device="cuda").manual_seed(0)
    for rows, vocab, s2 in [(64, 1024, False), (64, 4096, True), (3, 100, False)]:
        logits = (
            (torch.randn(rows, vocab, generator=g, device="cuda") * 1.5)
            .to(torch.bfloat16)
            .float()
        )
        temperature = torch.rand(rows, generator=g, device="cuda") + 0.1
        top_p = torch.rand(rows, generator=g, device="cuda") * 0.9 + 0.05
        greedy = torch.rand(rows, generator=g, device="cuda") < 0.2
        temperature[greedy] = 0
        penalty = 1 + torch.rand(rows, generator=g, device="cuda")
        prev = torch.randint(0, vocab, (rows, 16), generator=g, device="cuda")
        top_k = torch.randint(1, 100, (rows,), generator=g, device="cuda")
        noise = torch.empty(rows, vocab, device="cuda").exponential_(1, generator=g)
        saved = fish._exp_noise
        fish._exp_noise = lambda like, generators, q=noise: q
        try:
            if s2:
                want = fish._s2_sample(
                    logits, greedy, temperature, top_p, top_k, {}, False
                )
            else:
                want = fish._fish_sample(
                    logits, greedy, temperature, top_p, penalty, prev, {}, False
                )
        finally:
            fish._exp_noise = saved
        got = fused_sample(
            logits,
            greedy,
            temperature,
            top_p,
            noise,
            penalty=None if s2 else penalty,
            prev=None if s2 else prev,
            top_k=top_k if s2 else None,
        )
        assert torch.equal(got, want), (rows, vocab, s2)


def test_semantic_only_head_equals_masked_full_head(s1_dir):
    """S1 opt-in: the slice head gives the logits of the full head on the
    semantic ids + im_end (greedy choices among them are the same as a full
    head whose other rows are masked)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=[282, 104, 101, 108, 108, 111])
    out = {}
    for flag in (True, False):
        llm = LLM(
            model=str(s1_dir),
            dtype="float32",
            max_model_len=256,
            gpu_memory_utilization=0.3,
            enforce_eager=True,
            max_logprobs=50,
            hf_overrides={"semantic_only_head": flag},
        )
        tok = llm.get_tokenizer()
        begin = tok.convert_tokens_to_ids("<|semantic:0|>")
        last = (
            begin + llm.llm_engine.vllm_config.model_config.hf_config.codebook_size - 1
        )
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        res = llm.generate(
            prompt,
            SamplingParams(temperature=0, max_tokens=1, logprobs=50, detokenize=False),
            use_tqdm=False,
        )
        out[flag] = res[0].outputs[0].logprobs[0]
        del llm
    sem, full = out[True], out[False]
    assert all(begin <= t <= last or t == im_end for t in sem)
    common = [t for t in sem if t in full]
    assert len(common) >= 2
    # same logits on the slice: log-prob differences agree
    ref = common[0]
    for t in common[1:]:
        d_sem = sem[t].logprob - sem[ref].logprob
        d_full = full[t].logprob - full[ref].logprob
        assert abs(d_sem - d_full) < 1e-4


def test_fused_codebook_embedding_sum_matches_torch():
    """The ``_speech_C`` kernel Fish's ``embed_input_ids`` calls on CUDA gives
    the torch reference (K gathers + adds, fp32 accumulation) at S1-mini
    shapes, for int32 and int64 codes, bf16 and fp32 tables."""
    from vllm.model_executor.layers.codebook_embedding import (
        codebook_embedding_sum,
        codebook_embedding_sum_ref,
        speech_ops_available,
    )

    assert speech_ops_available(), (
        "vllm._speech_C is not built: run `python setup.py build-kernels "
        "--site <site-packages>` (or build vLLM with the speech CMake target)"
    )
    g = torch.Generator(device="cuda").manual_seed(0)
    K, C, H, N = 10, 4096, 1024, 37
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(K * C, H, generator=g, device="cuda").to(dtype)
        for idx in (torch.int32, torch.int64):
            codes = torch.randint(0, C, (N, K), generator=g, device="cuda").to(idx)
            got = codebook_embedding_sum(codes, w, C)
            ref = codebook_embedding_sum_ref(codes, w, C)
            exact = w.float()[codes.long() + torch.arange(K, device="cuda") * C].sum(1)
            assert got.dtype == dtype and got.shape == (N, H)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
            torch.testing.assert_close(got.float(), exact, rtol=tol, atol=tol)


def test_async_scheduling_equals_sync(s1_dir):
    """Async scheduling (on by default for the model) feeds the codes of the
    step in flight from the device: same tokens and codes as synchronous
    scheduling, for greedy and seeded rows in one batch."""
    seeds = [None, 3, None, None, 5]
    a = _generate(s1_dir, seeds, async_scheduling=True)
    b = _generate(s1_dir, seeds, async_scheduling=False)
    assert a == b
