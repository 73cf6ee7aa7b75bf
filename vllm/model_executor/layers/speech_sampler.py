# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""One-launch top-p / top-k sampling of small vocabularies (Triton).

Fish Speech samples every residual codebook of a frame with fish-speech's
``sample``: a windowed repetition penalty, top-p on the untempered softmax
(optionally top-k, S2), then the temperature and ``argmax(probs / Exp(1))``.
In torch that is about twenty kernels per codebook (gather/scatter for the
penalty, a sort, two softmaxes, a cumsum, a scatter back, ...). This kernel
does one row per program in one launch; the exponential noise comes in as a
tensor so that seeded requests keep their own generators.

Equivalence with the torch reference (``fish_speech._fish_sample`` /
``_s2_sample``): the kept set of top-p is a prefix of the descending sort;
ties are ordered by ascending index, as a stable sort orders them
(PyTorch's CUDA sort of rows longer than 32 entries is stable; its CPU sort
is not). The cumulative sum is summed in a different order, so a token
whose cumulative probability equals ``top_p`` to the last bit may fall on
the other side.
"""

import torch

from vllm.triton_utils import HAS_TRITON, tl, triton

# the largest vocabulary one program sorts
FUSED_SAMPLE_MAX_VOCAB = 8192


@triton.jit
def _sample_rows(
    logits_ptr,
    logits_stride,
    noise_ptr,
    noise_stride,
    prev_ptr,
    prev_stride,
    penalty_ptr,
    temperature_ptr,
    top_p_ptr,
    top_k_ptr,
    greedy_ptr,
    out_ptr,
    n_cols,
    eps,
    NUM_PREV: tl.constexpr,
    HAS_TOP_K: tl.constexpr,
    ALL_GREEDY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    valid = offs < n_cols
    x = tl.load(
        logits_ptr + row * logits_stride + offs, mask=valid, other=float("-inf")
    ).to(tl.float32)

    # windowed repetition penalty, once per id: s < 0 ? s * rp : s / rp
    if NUM_PREV > 0:
        rp = tl.load(penalty_ptr + row).to(tl.float32)
        hit = offs < 0
        for p in tl.static_range(NUM_PREV):
            pid = tl.load(prev_ptr + row * prev_stride + p)
            hit = hit | (offs == pid)
        x = tl.where(hit, tl.where(x < 0, x * rp, x / rp), x)

    best = tl.argmax(x, axis=0, tie_break_left=True)
    if ALL_GREEDY:
        tl.store(out_ptr + row, best.to(tl.int64))
    else:
        # sort key: the float's order-preserving int32 bits over the
        # complemented index (ties: the lower index first, descending)
        bits = x.to(tl.int32, bitcast=True)
        okey = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = (okey.to(tl.int64) << 32) | (BLOCK - 1 - offs).to(tl.int64)
        skey = tl.sort(key, descending=True)
        sbits = (skey >> 32).to(tl.int32)
        sbits = sbits ^ ((sbits >> 31) & 0x7FFFFFFF)
        sval = sbits.to(tl.float32, bitcast=True)
        e = tl.exp(sval - tl.max(sval, axis=0))
        cum = tl.cumsum(e / tl.sum(e, axis=0), axis=0)
        top_p = tl.load(top_p_ptr + row).to(tl.float32)
        n_keep = tl.sum((cum <= top_p).to(tl.int32), axis=0)
        if HAS_TOP_K:
            n_keep = tl.minimum(n_keep, tl.load(top_k_ptr + row).to(tl.int32))
        n_keep = tl.maximum(n_keep, 1)
        ranks = tl.arange(0, BLOCK)
        kth = tl.max(tl.where(ranks == n_keep - 1, skey, -(2**62)), axis=0)
        keep = (key >= kth) & valid

        temp = tl.maximum(tl.load(temperature_ptr + row).to(tl.float32), eps)
        y = tl.where(keep, x, float("-inf")) / temp
        q = tl.exp(y - tl.max(y, axis=0))
        probs = q / tl.sum(q, axis=0)
        noise = tl.load(noise_ptr + row * noise_stride + offs, mask=valid, other=1.0)
        drawn = tl.argmax(
            tl.where(valid, probs / noise, -1.0), axis=0, tie_break_left=True
        )
        greedy = tl.load(greedy_ptr + row) != 0
        tl.store(out_ptr + row, tl.where(greedy, best, drawn).to(tl.int64))


def fused_sample_available(device: torch.device) -> bool:
    """Whether ``fused_sample`` can run on ``device`` (CUDA with Triton)."""
    return HAS_TRITON and device.type == "cuda"


def fused_sample(
    logits: torch.Tensor,
    greedy: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    noise: torch.Tensor,
    *,
    penalty: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    top_k: torch.Tensor | None = None,
    all_greedy: bool = False,
    eps: float = 1e-5,
    kernel=None,
) -> torch.Tensor:
    """Sampled ids [R] (int64) of ``logits`` [R, V] (V <= 8192).

    ``prev`` [R, P]: ids penalised by ``penalty`` [R] (each id once);
    ``top_k`` [R]: positions kept at most (S2); ``noise`` [R, V]: Exp(1)
    draws; ``greedy`` [R] rows take the argmax after the penalty.
    ``kernel``: another jit of ``_sample_rows`` (tests run one made under
    ``TRITON_INTERPRET=1`` on the CPU).
    """
    rows, cols = logits.shape
    if cols > FUSED_SAMPLE_MAX_VOCAB:
        raise ValueError(
            f"fused_sample handles up to {FUSED_SAMPLE_MAX_VOCAB} columns, got {cols}"
        )
    if logits.stride(-1) != 1 or noise.stride(-1) != 1:
        raise ValueError("logits and noise need unit stride along the vocabulary")
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    block = 1 << max(4, (cols - 1).bit_length())
    num_prev = 0 if prev is None else prev.shape[1]
    if prev is not None:
        prev = prev.long().contiguous()
        if penalty is None:
            raise ValueError("prev needs a penalty")
    (kernel or _sample_rows)[(rows,)](
        logits,
        logits.stride(0),
        noise,
        noise.stride(0),
        prev if prev is not None else out,
        prev.stride(0) if prev is not None else 0,
        penalty if penalty is not None else temperature,  # unread without prev
        temperature,
        top_p,
        top_k if top_k is not None else out,
        greedy,
        out,
        cols,
        eps,
        NUM_PREV=num_prev,
        HAS_TOP_K=top_k is not None,
        ALL_GREEDY=bool(all_greedy),
        BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
    )
    return out
