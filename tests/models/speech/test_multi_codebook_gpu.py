# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The V1 runner's multi-codebook path under async scheduling, on a GPU.

The CPU platform never schedules asynchronously; on a GPU async scheduling
is on by default for multi-codebook models. The toy model of
test_multi_codebook.py must give the same tokens and codes with and without
it: batches of different lengths, prompt codes, chunked prefill and
preemption. Skipped without CUDA (CI is CPU-only).
"""

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

HERE = Path(__file__).resolve().parent
REPO = Path(os.path.realpath(__file__)).parents[3]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(HERE))

STEPS = 24


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from make_demo_checkpoint import make_checkpoint

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), old]))
    yield make_checkpoint(tmp_path_factory.mktemp("ckpt") / "toy")
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def _run(ckpt, prompts, steps, **kw):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    torch.backends.cuda.matmul.allow_tf32 = False
    args = dict(
        dtype="float32",
        max_model_len=256,
        gpu_memory_utilization=0.2,
        max_num_seqs=8,
        max_num_batched_tokens=16,
        enable_chunked_prefill=True,
        model_class_overrides={"Qwen2ForCausalLM": "codebook_toy:ToyCodebookLM"},
    )
    args.update(kw)
    llm = LLM(str(ckpt), **args)
    try:
        cfg = llm.llm_engine.vllm_config
        params = [
            SamplingParams(
                temperature=0.0,
                max_tokens=steps,
                ignore_eos=True,
                detokenize=False,
                extra_args={"prompt_aux_codes": rows} if rows else None,
            )
            for _, rows in prompts
        ]
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p, _ in prompts],
            params,
            use_tqdm=False,
        )
        preempted = 0
        if not kw.get("disable_log_stats", True):
            preempted = sum(
                m.value
                for m in llm.llm_engine.get_metrics()
                if m.name == "vllm:num_preemptions"
            )
        res = [
            (list(o.outputs[0].token_ids), o.outputs[0].aux_token_ids.tolist())
            for o in outs
        ]
        return res, cfg.scheduler_config.async_scheduling, preempted
    finally:
        del llm


def _prompts(n=6):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        ids = rng.integers(3, 400, size=int(rng.integers(3, 45))).tolist()
        rows = (
            [
                [p, int(rng.integers(5)), int(rng.integers(5))]
                for p in range(1, len(ids), 2)
            ]
            if i % 2
            else []
        )
        out.append((ids, rows))
    return out


def test_async_is_default_and_matches_sync(ckpt):
    prompts = _prompts()
    a, on, _ = _run(ckpt, prompts, STEPS)
    b, off, _ = _run(ckpt, prompts, STEPS, async_scheduling=False)
    assert on is True and off is False
    assert a == b
    assert all(len(ids) == STEPS and len(aux) == STEPS for ids, aux in a)


def test_async_preemption_matches_sync(ckpt):
    rng = np.random.default_rng(1)
    prompts = [(rng.integers(3, 400, size=30).tolist(), []) for _ in range(4)]
    kw = dict(
        kv_cache_memory_bytes=128 * 1024,
        block_size=16,
        max_num_seqs=4,
        max_model_len=96,
        disable_log_stats=False,
    )
    a, on, pre_a = _run(ckpt, prompts, 40, **kw)
    b, _, _ = _run(ckpt, prompts, 40, async_scheduling=False, **kw)
    assert on is True and pre_a > 0
    assert a == b
