# SPDX-License-Identifier: Apache-2.0
"""A Fish Speech model holding only its fast transformer, for tests and
benchmarks of the fast codebook loop outside the engine.

``make_fast_loop(dims, version=..., fused=...)`` returns a
``FishSpeechForCausalLM`` built by its own ``_init_fast_transformer``, whose
fast-loop methods (``_fast_loop``, ``fast_logits``, ...) work as in the
engine, with random weights (norm weights around 1, linear weights scaled by
fan-in so that the logits are spread as a trained model's are, not all close
to 0).
"""

from types import SimpleNamespace

import torch
from torch import nn


def make_fast_loop(
    dims: dict,
    *,
    version: str = "s1",
    fused: bool = False,
    num_codebooks: int = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """``dims``: fast_dim, fast_n_head, fast_n_local_heads, fast_head_dim,
    fast_intermediate_size, n_fast_layer, codebook_size, qk_norm.
    ``fused``: the ``fused_fast_block`` path (vLLM's ``_C`` ops; forced on a
    CPU too, whose vLLM build has the same ops) and, on CUDA,
    ``fused_fast_sampler``."""
    from vllm.model_executor.models import fish_speech as fs

    device = torch.device(device)
    cfg = SimpleNamespace(
        dim=dims["fast_dim"],
        fast_dim=dims["fast_dim"],
        fast_n_head=dims["fast_n_head"],
        fast_n_local_heads=dims["fast_n_local_heads"],
        fast_head_dim=dims["fast_head_dim"],
        fast_intermediate_size=dims["fast_intermediate_size"],
        n_fast_layer=dims["n_fast_layer"],
        fast_attention_qkv_bias=False,
        fast_attention_o_bias=False,
        fast_attention_qk_norm=bool(dims.get("qk_norm", False)),
        norm_eps=1e-6,
        num_codebooks=num_codebooks,
        codebook_size=dims["codebook_size"],
        rope_base=1e6,
        fused_fast_block=fused,
        fused_fast_sampler=fused,
    )
    m = fs.FishSpeechForCausalLM.__new__(fs.FishSpeechForCausalLM)
    nn.Module.__init__(m)
    m.config, m.version = cfg, version
    m.num_codebooks, m.codebook_size = cfg.num_codebooks, cfg.codebook_size
    m._init_fast_transformer(cfg, device)
    m.fused_fast_block = fused
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    rope = m.fast_rope  # the model keeps its RoPE table in fp32
    m = m.to(device=device, dtype=dtype)
    m.fast_rope = rope.to(device)
    if fused:
        for layer in m.fast_layers:
            layer.feed_forward.merge_gate_up()
    return m
