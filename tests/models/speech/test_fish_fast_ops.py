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

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vllm.model_executor.models import fish_speech as fs

pytest.importorskip("vllm._C")
if not all(hasattr(torch.ops._C, op) for op in (
        "rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul")):
    pytest.skip("vLLM's _C ops are not built", allow_module_level=True)


def _fast_model(qk_norm: bool, fused: bool, version: str):
    cfg = SimpleNamespace(
        fast_dim=64, fast_n_head=4, fast_n_local_heads=2, fast_head_dim=16,
        fast_intermediate_size=96, fast_attention_qkv_bias=False,
        fast_attention_o_bias=False, fast_attention_qk_norm=qk_norm,
        norm_eps=1e-6, num_codebooks=6, codebook_size=128, rope_base=1e4,
    )
    m = fs.FishSpeechForCausalLM.__new__(fs.FishSpeechForCausalLM)
    nn.Module.__init__(m)
    m.config, m.version = cfg, version
    m.num_codebooks, m.codebook_size = cfg.num_codebooks, cfg.codebook_size
    m.norm_fastlayer_input = False
    m.fast_project_in = nn.Identity()
    m.fast_embeddings = nn.Embedding(cfg.codebook_size, cfg.fast_dim)
    m.fast_layers = nn.ModuleList(fs._FastBlock(cfg) for _ in range(2))
    m.fast_norm = fs._FastRMSNorm(cfg.fast_dim, cfg.norm_eps)
    m.fast_output = nn.Linear(cfg.fast_dim, cfg.codebook_size, bias=False)
    m.register_buffer("fast_rope", fs.fish_rope_table(
        cfg.num_codebooks, cfg.fast_head_dim, cfg.rope_base), persistent=False)
    m.register_buffer("fast_positions", torch.arange(cfg.num_codebooks),
                      persistent=False)
    m._fast_cos_sin_cache = {}
    m.fused_fast_block, m.fused_fast_sampler = fused, False
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    if fused:
        for layer in m.fast_layers:
            layer.feed_forward.merge_gate_up()
    return m


def _inputs(m, rows):
    gen = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, m.config.fast_dim, generator=gen)
    c0 = torch.randint(0, m.codebook_size, (rows,), generator=gen)
    window = torch.randint(0, m.codebook_size, (rows, 16, m.num_codebooks + 1),
                           generator=gen)
    ones = torch.ones(rows)
    return (hidden, c0, torch.ones(rows, dtype=torch.bool), ones * 0, ones * 0.8,
            ones * 1.2, torch.full((rows,), m.codebook_size), window)


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
