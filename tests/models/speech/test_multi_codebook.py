# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The V1 runner's multi-codebook path (SupportsMultiCodebook), on CPU.

A toy model (codebook_toy.py) on the tiny demo Qwen2 is compared with an HF
transformers loop that recomputes every step: tokens and codes must match
exactly for plain prompts, prompts carrying codes, batches of different
lengths, chunked prefill and preemption.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
REPO = Path(os.path.realpath(__file__)).parents[3]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(HERE))

from codebook_toy import BOOK, NUM_AUX, reference_generate  # noqa: E402

STEPS = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from make_demo_checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "toy")


@pytest.fixture(scope="module")
def hf_model(ckpt):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def _llm(ckpt, **kw):
    from vllm import LLM

    args = dict(
        dtype="float32",
        max_model_len=256,
        enforce_eager=True,
        kv_cache_memory_bytes=64 << 20,
        max_num_seqs=8,
        model_class_overrides={"Qwen2ForCausalLM": "codebook_toy:ToyCodebookLM"},
    )
    args.update(kw)
    return LLM(str(ckpt), **args)


@pytest.fixture(scope="module")
def llm(ckpt):
    old = os.environ.get("PYTHONPATH")
    # The engine core runs in a child process: it must import codebook_toy.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), old]))
    # Small token budget: prompts longer than 16 tokens are chunked.
    llm = _llm(ckpt, max_num_batched_tokens=16, enable_chunked_prefill=True)
    yield llm
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def _prompts():
    rng = np.random.default_rng(0)
    plain = rng.integers(3, 400, size=7).tolist()
    long = rng.integers(3, 400, size=41).tolist()  # 3 prefill chunks
    coded = rng.integers(3, 400, size=20).tolist()
    coded_rows = [
        [p, int(rng.integers(BOOK)), int(rng.integers(BOOK))] for p in range(4, 15)
    ]
    return [(plain, []), (long, []), (coded, coded_rows)]


def _params(rows=None, steps=STEPS):
    from vllm import SamplingParams

    extra = {"prompt_aux_codes": rows} if rows else None
    return SamplingParams(
        temperature=0.0,
        max_tokens=steps,
        ignore_eos=True,
        detokenize=False,
        extra_args=extra,
    )


def _expected(hf_model, ids, rows, steps=STEPS):
    aux = np.zeros((len(ids), NUM_AUX), np.int64)
    for p, *codes in rows:
        aux[p] = codes
    return reference_generate(hf_model, ids, aux.tolist(), steps)


def test_config_switches(llm):
    cfg = llm.llm_engine.vllm_config
    assert cfg.model_config.is_multi_codebook
    assert cfg.scheduler_config.async_scheduling is False
    assert cfg.cache_config.enable_prefix_caching is False


def test_batch_matches_reference(llm, hf_model):
    from vllm.inputs import TokensPrompt

    prompts = _prompts()
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p, _ in prompts],
        [_params(rows) for _, rows in prompts],
        use_tqdm=False,
    )
    for (ids, rows), out in zip(prompts, outs):
        comp = out.outputs[0]
        ref_ids, ref_aux = _expected(hf_model, ids, rows)
        assert list(comp.token_ids) == ref_ids
        assert comp.aux_token_ids is not None
        assert comp.aux_token_ids.shape == (STEPS, NUM_AUX)
        assert comp.aux_token_ids.tolist() == ref_aux


def test_prompt_codes_change_generation(llm):
    from vllm.inputs import TokensPrompt

    ids, rows = _prompts()[2]
    zeroed = [[p, 0, 0] for p, *_ in rows]
    a, b = llm.generate(
        [TokensPrompt(prompt_token_ids=ids)] * 2,
        [_params(rows), _params(zeroed)],
        use_tqdm=False,
    )
    assert (
        a.outputs[0].token_ids != b.outputs[0].token_ids
        or a.outputs[0].aux_token_ids.tolist() != b.outputs[0].aux_token_ids.tolist()
    )


@pytest.mark.parametrize(
    "rows, match",
    [
        ([[0, 1]], "must be integer rows"),
        ([[99, 1, 1]], "positions must lie in the prompt"),
        ([[0, 1, BOOK]], f"codes must be < {BOOK}"),
        ([[0, -1, 0]], "codes must be >= 0"),
    ],
)
def test_bad_prompt_codes_rejected(llm, rows, match):
    from vllm.inputs import TokensPrompt

    with pytest.raises(ValueError, match=match):
        llm.generate(
            TokensPrompt(prompt_token_ids=[5, 6, 7]), _params(rows), use_tqdm=False
        )
    # The engine keeps serving.
    out = llm.generate(
        TokensPrompt(prompt_token_ids=[5, 6, 7]), _params(steps=2), use_tqdm=False
    )
    assert len(out[0].outputs[0].token_ids) == 2


def test_preemption_keeps_codes(ckpt, hf_model, llm):
    """A KV cache too small for all requests forces preemption and
    re-prefill; codes must still follow the reference."""
    del llm  # keep PYTHONPATH set by the shared fixture
    from vllm.inputs import TokensPrompt

    small = _llm(
        ckpt,
        kv_cache_memory_bytes=128 * 1024,
        block_size=16,
        max_num_seqs=4,
        max_model_len=96,
        disable_log_stats=False,
    )
    try:
        rng = np.random.default_rng(1)
        prompts = [rng.integers(3, 400, size=30).tolist() for _ in range(4)]
        steps = 40
        outs = small.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            [_params(steps=steps)] * 4,
            use_tqdm=False,
        )
        stats = small.llm_engine.get_metrics()
        for p, out in zip(prompts, outs):
            ref_ids, ref_aux = _expected(hf_model, p, [], steps)
            assert list(out.outputs[0].token_ids) == ref_ids
            assert out.outputs[0].aux_token_ids.tolist() == ref_aux
        preempted = [m for m in stats if m.name == "vllm:num_preemptions"]
        assert preempted and preempted[0].value > 0
    finally:
        del small
