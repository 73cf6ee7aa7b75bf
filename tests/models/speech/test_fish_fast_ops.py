# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The Fish fast transformer on vLLM's fused ops (``fused_fast_block``)
against its torch path, on the CPU.

vLLM's CPU build has the same ``_C`` ops as the CUDA one (rms_norm,
fused_add_rms_norm, rotary_embedding, silu_and_mul), so the layout of
``_FastBlock.forward_ops`` (the flattened rows, the positions of each row,
RoPE in place on the q/k views, the cache writes, GQA in one SDPA call, the
merged w1/w3 GEMM) is checked here in fp32 for several rows; on a GPU
``test_fish_speech_gpu.py`` runs the engine with it.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(os.path.realpath(__file__)).parents[3] / "tools"))
from fish_fast_loop import make_fast_loop  # noqa: E402

pytest.importorskip("vllm._C")
if not all(
    hasattr(torch.ops._C, op)
    for op in ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul")
):
    pytest.skip("vLLM's _C ops are not built", allow_module_level=True)


DIMS = dict(
    fast_dim=64,
    fast_n_head=4,
    fast_n_local_heads=2,
    fast_head_dim=16,
    fast_intermediate_size=96,
    n_fast_layer=2,
    codebook_size=128,
)


def _fast_model(qk_norm: bool, fused: bool, version: str):
    return make_fast_loop(
        {**DIMS, "qk_norm": qk_norm}, version=version, fused=fused, num_codebooks=6
    )


def _inputs(m, rows):
    gen = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, m.config.fast_dim, generator=gen)
    c0 = torch.randint(0, m.codebook_size, (rows,), generator=gen)
    window = torch.randint(
        0, m.codebook_size, (rows, 16, m.num_codebooks + 1), generator=gen
    )
    ones = torch.ones(rows)
    return (
        hidden,
        c0,
        torch.ones(rows, dtype=torch.bool),
        ones * 0,
        ones * 0.8,
        ones * 1.2,
        torch.full((rows,), m.codebook_size),
        window,
    )


@pytest.mark.parametrize("qk_norm,version", [(False, "s1"), (True, "s2")])
@pytest.mark.parametrize("rows", [1, 3])
def test_fused_fast_block_equals_torch_path(qk_norm, version, rows):
    plain = _fast_model(qk_norm, False, version)
    fused = _fast_model(qk_norm, True, version)
    # the merged gate/up weight is what w1 and w3 now view
    ff = fused.fast_layers[0].feed_forward
    assert ff.w1.weight.data_ptr() == ff.w13.data_ptr()
    plain_ff = plain.fast_layers[0].feed_forward
    torch.testing.assert_close(ff.w1.weight, plain_ff.w1.weight)
    args = _inputs(plain, rows)
    with torch.no_grad():
        # logits of every codebook step of the loop, teacher-forced
        x0 = plain.fast_input(args[0])
        x = torch.stack([x0, plain.fast_embeddings(args[1])], dim=1)
        caches = [plain._new_fast_caches(rows, x0), fused._new_fast_caches(rows, x0)]
        pos = 0
        for _ in range(1, plain.num_codebooks):
            want = plain.fast_logits(x.clone(), pos, caches[0])
            got = fused.fast_logits(x.clone(), pos, caches[1])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            pos += x.shape[1]
            x = plain.fast_embeddings(want.argmax(-1))[:, None]
        for (k0, v0), (k1, v1) in zip(caches[0], caches[1]):
            torch.testing.assert_close(k1, k0, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(v1, v0, rtol=1e-4, atol=1e-4)
        # the whole loop: the same greedy codes
        assert torch.equal(fused._fast_loop(*args), plain._fast_loop(*args))
