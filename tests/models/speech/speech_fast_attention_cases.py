# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Cases of test_speech_fast_attention.py, run under ``TRITON_INTERPRET=1``.

``python speech_fast_attention_cases.py OUT.pt``: the decode-attention kernel
(Triton's interpreter, on the CPU) against the op path it replaces in
``_FastAttention.forward_ops`` (vLLM's CPU rms_norm and rotary_embedding,
the cache writes, SDPA); then the Fish fast loop with and without it.
Saves {case: {name: tensor}}.
"""

import math
import os
import sys
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton_interpret import rejit  # noqa: E402

import vllm._custom_ops  # noqa: E402, F401  (the _C ops)
from vllm.model_executor.layers import speech_fast_attention as sfa  # noqa: E402

sys.path.insert(0, str(Path(os.path.realpath(__file__)).parents[3] / "tools"))


def _kernel():
    return rejit(sfa._decode_attention, _rope_norm=rejit(sfa._rope_norm))


def _ops_norm(x, w, eps):
    out = torch.empty_like(x)
    torch.ops._C.rms_norm(out, x.contiguous(), w, eps)
    return out


def reference(q, k, v, k_cache, v_cache, pos, cos_sin, scale, qn, kn, eps):
    """What ``_FastAttention.forward_ops`` does at one position without the
    kernel (its caches are updated in place)."""
    rows, kv, _, d = k_cache.shape
    q, k = q.clone(), k.clone()
    if qn is not None:
        q = _ops_norm(q.reshape(-1, d), qn, eps).view(rows, -1)
        k = _ops_norm(k.reshape(-1, d), kn, eps).view(rows, -1)
    positions = torch.full((rows,), pos, dtype=torch.long)
    torch.ops._C.rotary_embedding(positions, q, k, d, cos_sin, False)
    k_cache[:, :, pos] = k.view(rows, kv, d)
    v_cache[:, :, pos] = v.reshape(rows, kv, d)
    y = F.scaled_dot_product_attention(
        q.view(rows, 1, -1, d).transpose(1, 2),
        k_cache[:, :, : pos + 1],
        v_cache[:, :, : pos + 1],
        scale=scale,
        enable_gqa=True,
    )
    return y.transpose(1, 2).reshape(rows, -1)


def _cos_sin(n, d, dtype):
    inv = 1.0 / (1e4 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.arange(n).float()[:, None] * inv[None]
    return torch.cat([ang.cos(), ang.sin()], dim=-1).to(dtype)


def kernel_cases(k, results):
    # (rows, heads, kv heads, head size, cache length, position, qk norm, dtype)
    cases = [
        (3, 4, 2, 16, 6, 4, False, torch.float32),
        (2, 8, 1, 32, 10, 0, False, torch.float32),  # first position, MQA
        (1, 6, 2, 16, 10, 9, True, torch.float32),  # group of 3, last slot
        (4, 4, 4, 64, 8, 5, True, torch.float32),  # no GQA
        (3, 16, 2, 64, 10, 7, False, torch.bfloat16),
        (2, 8, 2, 32, 10, 3, True, torch.bfloat16),
    ]
    gen = torch.Generator().manual_seed(0)
    for rows, h, kv, d, t, pos, norm, dtype in cases:
        qkv = torch.randn(rows, (h + 2 * kv) * d, generator=gen).to(dtype)
        q, kk, v = qkv.split([h * d, kv * d, kv * d], dim=-1)  # strided views
        caches = [
            torch.randn(rows, kv, t, d, generator=gen).to(dtype) for _ in range(2)
        ]
        qn = kn = None
        if norm:
            qn = (1 + 0.2 * torch.randn(d, generator=gen)).to(dtype)
            kn = (1 + 0.2 * torch.randn(d, generator=gen)).to(dtype)
        cs = _cos_sin(t, d, dtype)
        scale = 1 / math.sqrt(d)
        ref_caches = [c.clone() for c in caches]
        want = reference(q, kk, v, *ref_caches, pos, cs, scale, qn, kn, 1e-6)
        got = sfa.decode_attention(
            q, kk, v, *caches, pos, cs, scale, q_norm=qn, k_norm=kn, eps=1e-6, kernel=k
        )
        kind = "norm" if norm else "plain"
        name = f"r{rows}-h{h}-kv{kv}-d{d}-t{t}-p{pos}-{kind}-{dtype}"
        results[name] = dict(
            got=got,
            want=want,
            k=caches[0],
            want_k=ref_caches[0],
            v=caches[1],
            want_v=ref_caches[1],
        )


def loop_cases(k, results):
    """The Fish fast loop on vLLM's CPU ops (``fused_fast_block``), with the
    decode positions through the kernel and through the op path."""
    from fish_fast_loop import make_fast_loop

    sfa._decode_attention = k  # decode_attention() launches this jit
    dims = dict(
        fast_dim=64,
        fast_n_head=4,
        fast_n_local_heads=2,
        fast_head_dim=16,
        fast_intermediate_size=96,
        n_fast_layer=2,
        codebook_size=128,
    )
    for qk_norm, version in [(False, "s1"), (True, "s2")]:
        m = make_fast_loop(
            {**dims, "qk_norm": qk_norm}, version=version, fused=True, num_codebooks=6
        )
        rows = 3
        gen = torch.Generator().manual_seed(1)
        x0 = m.fast_input(torch.randn(rows, dims["fast_dim"], generator=gen))
        c0 = torch.randint(0, 128, (rows,), generator=gen)
        out = {}
        for use in (False, True):
            for layer in m.fast_layers:
                layer.attention.decode_kernel = use
            caches = m._new_fast_caches(rows, x0)
            x = torch.stack([x0, m.fast_embeddings(c0)], dim=1)
            pos, logits, codes = 0, [], []
            with torch.no_grad():
                for _ in range(1, m.num_codebooks):
                    lg = m.fast_logits(x.clone(), pos, caches)
                    pos += x.shape[1]
                    logits.append(lg)
                    codes.append(lg.argmax(-1))
                    x = m.fast_embeddings(codes[-1])[:, None]
            out[use] = (
                torch.stack(logits),
                torch.stack(codes),
                torch.stack([c for kv in caches for c in kv]),
            )
        results[f"loop-{version}"] = dict(
            got=out[True][0],
            want=out[False][0],
            got_codes=out[True][1],
            want_codes=out[False][1],
            got_cache=out[True][2],
            want_cache=out[False][2],
        )


def main(out):
    k = _kernel()
    results = {}
    kernel_cases(k, results)
    loop_cases(k, results)
    torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
