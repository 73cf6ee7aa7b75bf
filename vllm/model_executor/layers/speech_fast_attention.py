# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""One-launch decode attention of a short per-frame transformer (Triton).

Fish Speech's fast transformer runs once per residual codebook with a
sequence of at most ``num_codebooks`` positions, its KV cache a dense
``[rows, kv_heads, positions, head_dim]`` tensor of the frame. One decode
position costs, in torch ops, an optional q/k RMSNorm (S2), RoPE, two cache
writes, SDPA and a transpose copy: six to nine kernels of a few
microseconds each, 36 times per frame. This kernel does all of that for
one (row, kv head) per program:

- q/k RMSNorm over each head (fp32 statistics, the normalised value cast
  to the activation dtype before the weight, as vLLM's ``rms_norm``);
- GPT-J (interleaved) RoPE at ``pos`` from a vLLM ``cos_sin_cache``
  ``[max_pos, head_dim]`` (cos half, sin half), computed in fp32;
- the new k/v written to the cache at ``pos``;
- softmax(q k^T * scale) v over the positions ``0..pos`` for the query
  heads of the group (GQA: query head h reads kv head h // group), fp32;
- the output written as ``[rows, heads * head_dim]``, the layout ``wo``
  takes, so that no transpose copy follows.
"""

import torch

from vllm.triton_utils import HAS_TRITON, tl, triton

MAX_POSITIONS = 64


@triton.jit
def _rope_norm(
    ptr,
    norm_w_ptr,
    cos,
    sin,
    half,
    hmask,
    eps,
    D: tl.constexpr,
    QK_NORM: tl.constexpr,
):
    """The even/odd halves of heads at ptr [H, D] (rows of D), optionally
    RMS-normalised, rotated: two [H, D/2] fp32 tensors."""
    xe = tl.load(ptr + 2 * half, mask=hmask, other=0.0)
    xo = tl.load(ptr + 2 * half + 1, mask=hmask, other=0.0)
    if QK_NORM:
        fe = xe.to(tl.float32)
        fo = xo.to(tl.float32)
        ms = (tl.sum(fe * fe, axis=1) + tl.sum(fo * fo, axis=1)) / D
        inv = 1.0 / tl.sqrt(ms + eps)
        wl = tl.arange(0, D // 2)
        we = tl.load(norm_w_ptr + 2 * wl).to(tl.float32)
        wo = tl.load(norm_w_ptr + 2 * wl + 1).to(tl.float32)
        xe = (fe * inv[:, None]).to(xe.dtype).to(tl.float32) * we[None, :]
        xo = (fo * inv[:, None]).to(xo.dtype).to(tl.float32) * wo[None, :]
        # vLLM's rms_norm returns the activation dtype
        xe = xe.to(ptr.dtype.element_ty)
        xo = xo.to(ptr.dtype.element_ty)
    xe = xe.to(tl.float32)
    xo = xo.to(tl.float32)
    return xe * cos - xo * sin, xo * cos + xe * sin


@triton.jit
def _decode_attention(
    q_ptr,
    q_stride,
    k_ptr,
    k_stride,
    v_ptr,
    v_stride,
    k_cache_ptr,
    v_cache_ptr,
    cache_stride_r,
    cache_stride_h,
    cache_stride_t,
    cos_sin_ptr,
    q_norm_ptr,
    k_norm_ptr,
    out_ptr,
    out_stride,
    pos,
    scale,
    eps,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    QK_NORM: tl.constexpr,
):
    row = tl.program_id(0)
    g = tl.program_id(1)
    half = tl.arange(0, D // 2)
    cos = tl.load(cos_sin_ptr + pos * D + half).to(tl.float32)[None, :]
    sin = tl.load(cos_sin_ptr + pos * D + D // 2 + half).to(tl.float32)[None, :]

    # the new key (one head) and value of this kv head, into the cache
    one = tl.arange(0, 1)
    k_head = k_ptr + row * k_stride + g * D + one[:, None] * D
    ke, ko = _rope_norm(
        k_head, k_norm_ptr, cos, sin, half[None, :], one[:, None] >= 0, eps, D, QK_NORM
    )
    dtype = k_cache_ptr.dtype.element_ty
    ke = ke.to(dtype)
    ko = ko.to(dtype)
    cache = row * cache_stride_r + g * cache_stride_h
    slot = k_cache_ptr + cache + pos * cache_stride_t + 2 * half[None, :]
    tl.store(slot, ke)
    tl.store(slot + 1, ko)
    dd = tl.arange(0, D)
    v_new = tl.load(v_ptr + row * v_stride + g * D + dd)
    tl.store(v_cache_ptr + cache + pos * cache_stride_t + dd, v_new.to(dtype))

    # the group's queries [BLOCK_G, D/2] x2
    hq = tl.arange(0, BLOCK_G)
    gmask = hq < GROUP
    q_head = q_ptr + row * q_stride + (g * GROUP + hq)[:, None] * D
    qe, qo = _rope_norm(
        q_head, q_norm_ptr, cos, sin, half[None, :], gmask[:, None], eps, D, QK_NORM
    )
    qe = qe.to(q_ptr.dtype.element_ty).to(tl.float32)
    qo = qo.to(q_ptr.dtype.element_ty).to(tl.float32)

    # keys 0..pos: the earlier ones from the cache, this one from registers
    t = tl.arange(0, BLOCK_T)
    earlier = t < pos
    kbase = k_cache_ptr + cache + t[:, None] * cache_stride_t + 2 * half[None, :]
    kce = tl.load(kbase, mask=earlier[:, None], other=0.0).to(tl.float32)
    kco = tl.load(kbase + 1, mask=earlier[:, None], other=0.0).to(tl.float32)
    now = (t == pos)[:, None]
    kce = tl.where(now, ke.to(tl.float32), kce)
    kco = tl.where(now, ko.to(tl.float32), kco)
    s = tl.sum(qe[:, None, :] * kce[None, :, :], axis=2)
    s += tl.sum(qo[:, None, :] * kco[None, :, :], axis=2)
    s = tl.where((t <= pos)[None, :], s * scale, float("-inf"))
    p = tl.exp(s - tl.max(s, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]

    vbase = v_cache_ptr + cache + t[:, None] * cache_stride_t + dd[None, :]
    vc = tl.load(vbase, mask=earlier[:, None], other=0.0).to(tl.float32)
    vc = tl.where(now, v_new.to(dtype).to(tl.float32)[None, :], vc)
    o = tl.sum(p[:, :, None] * vc[None, :, :], axis=1)
    optr = out_ptr + row * out_stride + (g * GROUP + hq)[:, None] * D + dd[None, :]
    tl.store(optr, o.to(out_ptr.dtype.element_ty), mask=gmask[:, None])


def decode_attention_available(device: torch.device) -> bool:
    """Whether ``decode_attention`` can run on ``device`` (CUDA with Triton)."""
    return HAS_TRITON and device.type == "cuda"


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: int,
    cos_sin: torch.Tensor,
    scale: float,
    *,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
    kernel=None,
) -> torch.Tensor:
    """Attention of one new position ``pos`` per row.

    q [R, H*D], k and v [R, KV*D] (the un-rotated, un-normalised outputs of
    the qkv projection; strided views are fine), caches [R, KV, T, D] with
    positions ``0..pos-1`` filled (this call writes ``pos``), ``cos_sin``
    [>pos, D]. Returns [R, H*D] in q's dtype. ``q_norm`` / ``k_norm`` [D]:
    the per-head RMSNorm weights (S2), with ``eps``. ``kernel``: another jit
    of ``_decode_attention`` (tests run one under ``TRITON_INTERPRET=1``)."""
    rows, kv_heads, max_t, d = k_cache.shape
    heads = q.shape[1] // d
    if heads * d != q.shape[1] or k.shape[1] != kv_heads * d or heads % kv_heads:
        raise ValueError(
            f"decode_attention: q {tuple(q.shape)} / k {tuple(k.shape)} do not "
            f"fit a cache of {kv_heads} kv heads of size {d}"
        )
    if not 0 <= pos < max_t or max_t > MAX_POSITIONS:
        raise ValueError(
            f"decode_attention: position {pos} outside a cache of {max_t} "
            f"(at most {MAX_POSITIONS})"
        )
    if d & (d - 1) or d < 2:
        raise ValueError(f"decode_attention: head size {d} is not a power of 2")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("decode_attention: give both q_norm and k_norm or neither")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(1) != 1 or t.shape[0] != rows:
            raise ValueError(
                f"decode_attention: {name} must be [rows, n*D] with unit column stride"
            )
    if k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("decode_attention: caches must be alike, innermost dense")
    out = torch.empty(rows, heads * d, dtype=q.dtype, device=q.device)
    if rows == 0:
        return out
    group = heads // kv_heads
    norm = q_norm is not None
    (kernel or _decode_attention)[(rows, kv_heads)](
        q, q.stride(0), k, k.stride(0), v, v.stride(0),
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        cos_sin.contiguous(),
        q_norm if norm else cos_sin, k_norm if norm else cos_sin,
        out, out.stride(0), pos, scale, eps,
        GROUP=group,
        BLOCK_G=1 << (group - 1).bit_length(),
        D=d,
        BLOCK_T=1 << (max_t - 1).bit_length(),
        QK_NORM=norm,
    )  # fmt: skip
    return out
