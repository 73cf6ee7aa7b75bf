# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Fish Speech dual-AR text-to-semantic LM (fish-speech 1.5, OpenAudio S1
family, Fish Audio S2-Pro), loaded from the original release directories.

Per step the *slow* transformer (vLLM layers, paged KV cache) predicts one
main token over the whole vocabulary; for a semantic token ``<|semantic:c0|>``
codebook 0 is ``c0``. The *fast* transformer (a few plain torch layers, at
most ``num_codebooks`` positions, its KV cache rebuilt every frame) then
predicts codebooks ``1..N-1`` from the slow hidden state. Both run for the
whole batch inside ``sample_codebooks`` (``SupportsMultiCodebook``), which
replaces vLLM's sampler with each family's own sampling:

* 1.5 / S1: windowed repetition penalty (16 recent frames, taken from a
  zero-initialised window that starts after the first generated frame; the
  first frame has no penalty), top-p on the *untempered* softmax, then the
  temperature; S1 penalises the slow token with window *column* 0 (one frame
  across all codebook rows) and restricts residual codes to the first 1024
  entries, as the original ``decode_one_token_ar``; 1.5 uses window row 0.
  S1 casts temperature / top-p / penalty to bf16 before use (``generate``);
  so does this sampler.
* S2: only semantic tokens and ``<|im_end|>`` for the slow token, top-k and
  top-p (on the untempered softmax), then the temperature, no repetition
  penalty, and repetition-aware resampling (RAS) of a semantic token seen in
  the last 10 frames.

Both originals keep their window only from the second generated frame on
(the first is sampled at prefill without it), so ``codebook_history_window``
is one more than the original window and column 0 is skipped.

Faithful details: interleaved (GPT-J) RoPE with the cos/sin table rounded to
bf16 as the original stores it; per-head q/k RMSNorm before RoPE (S1/S2);
codebook embeddings summed at semantic positions and scaled by
``1/sqrt(N+1)`` when ``scale_codebook_embeddings``; the fast transformer
reads the pre-final-norm hidden state (1.5/S1) or the normed one (S2).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.codebook_embedding import codebook_embedding_sum
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
from vllm.model_executor.layers.speech_fast_attention import (
    decode_attention,
    decode_attention_available,
)
from vllm.model_executor.layers.speech_sampler import (
    FUSED_SAMPLE_MAX_VOCAB,
    fused_sample,
    fused_sample_available,
)
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.fish_speech_fast import FastLoopGraphs
from vllm.model_executor.models.fish_speech_tts import FishSpeechTTSMixin
from vllm.sequence import IntermediateTensors

if TYPE_CHECKING:
    from vllm.config import ModelConfig
    from vllm.v1.sample.metadata import SamplingMetadata

logger = init_logger(__name__)

_SAMPLING_EPS = 1e-5
# fish-speech S1/1.5 `decode_n_tokens`: win_size = 16 (see codebook_history_window)
_FISH_WINDOW = 16
# S2 repetition-aware sampling window
_S2_RAS_WINDOW = 10
# S1 limits residual codebooks (1..N-1) to the first 1024 codes
_S1_RESIDUAL_CODES = 1024


class FishRotaryEmbedding(RotaryEmbedding):
    """Interleaved (GPT-J style) RoPE whose cos/sin table is rounded to bf16,
    as fish-speech's ``precompute_freqs_cis`` stores it."""

    def _compute_cos_sin_cache(self) -> torch.Tensor:
        return super()._compute_cos_sin_cache().to(torch.bfloat16).float()


def fish_rope_table(seq_len: int, head_dim: int, base: float) -> torch.Tensor:
    """[seq_len, head_dim//2, 2] (cos, sin), bf16-rounded, in fp32."""
    freqs = 1.0 / (
        base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim)
    )
    t = torch.arange(seq_len, dtype=torch.float)
    ang = torch.outer(t, freqs)
    return torch.stack([ang.cos(), ang.sin()], -1).to(torch.bfloat16).float()


def apply_interleaved_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D]; table [L, D//2, 2]. fp32 math, cast back."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    t = table[None, :, None]
    out = torch.stack(
        [
            xs[..., 0] * t[..., 0] - xs[..., 1] * t[..., 1],
            xs[..., 1] * t[..., 0] + xs[..., 0] * t[..., 1],
        ],
        -1,
    )
    return out.flatten(3).type_as(x)


# --------------------------------------------------------------------------
# Slow transformer (vLLM layers)
# --------------------------------------------------------------------------


class FishAttention(nn.Module):
    def __init__(
        self,
        config,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.total_num_heads = config.n_head
        self.total_num_kv_heads = config.n_local_heads
        assert self.total_num_heads % tp == 0
        self.num_heads = self.total_num_heads // tp
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp)
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.wqkv = QKVParallelLinear(
            config.dim,
            self.head_dim,
            self.total_num_heads,
            self.total_num_kv_heads,
            bias=config.attention_qkv_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.wqkv",
        )
        self.wo = RowParallelLinear(
            self.total_num_heads * self.head_dim,
            config.dim,
            bias=bool(getattr(config, "attention_o_bias", False)),
            quant_config=quant_config,
            prefix=f"{prefix}.wo",
        )
        self.qk_norm = bool(getattr(config, "attention_qk_norm", False))
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.norm_eps)
        self.rotary_emb = FishRotaryEmbedding(
            self.head_dim,
            self.head_dim,
            config.max_seq_len,
            float(config.rope_base),
            False,  # interleaved pairs (2j, 2j+1), not NeoX halves
            torch.get_default_dtype(),
        )
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.wqkv(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim)).view(
                k.shape
            )
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.wo(self.attn(q, k, v))
        return out


class FishFeedForward(nn.Module):
    def __init__(self, config, quant_config, prefix: str) -> None:
        super().__init__()
        self.w13 = MergedColumnParallelLinear(
            config.dim,
            [config.intermediate_size] * 2,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.w13",
        )
        self.w2 = RowParallelLinear(
            config.intermediate_size,
            config.dim,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.w2",
        )
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.w13(x)
        out, _ = self.w2(self.act(h))
        return out


class FishBlock(nn.Module):
    def __init__(self, config, cache_config, quant_config, prefix: str) -> None:
        super().__init__()
        self.attention = FishAttention(
            config, cache_config, quant_config, f"{prefix}.attention"
        )
        self.feed_forward = FishFeedForward(
            config, quant_config, f"{prefix}.feed_forward"
        )
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            x = self.attention_norm(x)
        else:
            x, residual = self.attention_norm(x, residual)
        x = self.attention(positions, x)
        x, residual = self.ffn_norm(x, residual)
        return self.feed_forward(x), residual


@support_torch_compile(dynamic_arg_dims={"positions": 0, "inputs_embeds": 0})
class FishSlowTransformer(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        cache_config = vllm_config.cache_config
        quant_config = vllm_config.quant_config
        self.config = config
        self.embeddings = VocabParallelEmbedding(config.vocab_size, config.dim)
        self.codebook_embeddings = VocabParallelEmbedding(
            config.codebook_size * config.num_codebooks, config.dim
        )
        self.layers = nn.ModuleList(
            FishBlock(config, cache_config, quant_config, f"{prefix}.layers.{i}")
            for i in range(config.n_layer)
        )
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        inputs_embeds: torch.Tensor,
    ) -> torch.Tensor:
        x = inputs_embeds
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        # Pre-final-norm hidden states: compute_logits applies `norm`
        return x + residual


# --------------------------------------------------------------------------
# Fast transformer (plain torch, <= num_codebooks positions)
# --------------------------------------------------------------------------


class _FastRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def _ops_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """vLLM's CUDA rms_norm (fp32 statistics, the normalised value cast to the
    input dtype before the weight, as fish-speech's RMSNorm) of x [T, D]."""
    x = x.contiguous()
    out = torch.empty_like(x)
    torch.ops._C.rms_norm(out, x, weight, eps)
    return out


def fused_fast_block_available(device: torch.device) -> bool:
    """Whether vLLM's CUDA ops for ``_FastBlock.forward_ops`` are built."""
    if device.type != "cuda":
        return False
    # The platform's kernel libraries (on CUDA ``vllm._C_stable_libtorch``,
    # which registers the ``_C`` ops; there is no ``vllm._C`` module there).
    import vllm._custom_ops  # noqa: F401

    return all(
        hasattr(torch.ops._C, op)
        for op in ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul")
    )


class _FastAttention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.n_head = config.fast_n_head
        self.n_kv = config.fast_n_local_heads
        self.head_dim = config.fast_head_dim
        total = (self.n_head + 2 * self.n_kv) * self.head_dim
        self.wqkv = nn.Linear(
            config.fast_dim, total, bias=bool(config.fast_attention_qkv_bias)
        )
        self.wo = nn.Linear(
            self.n_head * self.head_dim,
            config.fast_dim,
            bias=bool(config.fast_attention_o_bias),
        )
        self.qk_norm = bool(config.fast_attention_qk_norm)
        # forward_ops at one position: the decode_attention kernel (CUDA)
        self.decode_kernel = False
        if self.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        start: int,
        table: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        b, seqlen, _ = x.shape
        qs, kvs = self.n_head * self.head_dim, self.n_kv * self.head_dim
        q, k, v = self.wqkv(x).split([qs, kvs, kvs], dim=-1)
        q = q.view(b, seqlen, self.n_head, self.head_dim)
        k = k.view(b, seqlen, self.n_kv, self.head_dim)
        v = v.view(b, seqlen, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        tab = table[start : start + seqlen]
        q = apply_interleaved_rope(q, tab).transpose(1, 2)
        k = apply_interleaved_rope(k, tab).transpose(1, 2)
        k_cache, v_cache = cache
        end = start + seqlen
        k_cache[:, :, start:end] = k
        v_cache[:, :, start:end] = v.transpose(1, 2)
        rep = self.n_head // self.n_kv
        keys = k_cache[:, :, :end].repeat_interleave(rep, dim=1)
        vals = v_cache[:, :, :end].repeat_interleave(rep, dim=1)
        scores = q @ keys.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim))
        if seqlen > 1:
            qpos = torch.arange(start, end, device=x.device)[:, None]
            kpos = torch.arange(end, device=x.device)[None, :]
            scores = scores.masked_fill(kpos > qpos, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ vals
        return self.wo(y.transpose(1, 2).reshape(b, seqlen, qs))

    def forward_ops(
        self,
        x: torch.Tensor,
        start: int,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        eps: float,
    ) -> torch.Tensor:
        """``forward`` with vLLM's CUDA ops: x [R, L, D] -> [R*L, D]; RoPE
        in place on the q/k views of the qkv GEMM's output, GQA attention in
        one SDPA call."""
        b, seqlen, _ = x.shape
        qs, kvs = self.n_head * self.head_dim, self.n_kv * self.head_dim
        q, k, v = self.wqkv(x.view(b * seqlen, -1)).split([qs, kvs, kvs], dim=-1)
        if seqlen == 1 and self.decode_kernel:
            # one Triton launch: q/k norm, RoPE, cache write, GQA attention
            y = decode_attention(
                q,
                k,
                v,
                *cache,
                start,
                cos_sin,
                1.0 / math.sqrt(self.head_dim),
                q_norm=self.q_norm.weight if self.qk_norm else None,
                k_norm=self.k_norm.weight if self.qk_norm else None,
                eps=eps,
            )
            return self.wo(y)
        if self.qk_norm:
            q = _ops_rms_norm(q.reshape(-1, self.head_dim), self.q_norm.weight, eps)
            k = _ops_rms_norm(k.reshape(-1, self.head_dim), self.k_norm.weight, eps)
            q, k = q.view(b * seqlen, qs), k.view(b * seqlen, kvs)
        torch.ops._C.rotary_embedding(positions, q, k, self.head_dim, cos_sin, False)
        k_cache, v_cache = cache
        end = start + seqlen
        k_cache[:, :, start:end] = k.view(b, seqlen, self.n_kv, -1).transpose(1, 2)
        v_cache[:, :, start:end] = v.view(b, seqlen, self.n_kv, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q.view(b, seqlen, self.n_head, -1).transpose(1, 2),
            k_cache[:, :, :end],
            v_cache[:, :, :end],
            is_causal=seqlen > 1,  # only at start 0: a square causal mask
            scale=1.0 / math.sqrt(self.head_dim),
            enable_gqa=self.n_head != self.n_kv,
        )
        return self.wo(y.transpose(1, 2).reshape(b * seqlen, qs))


class _FastFeedForward(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        d, h = config.fast_dim, config.fast_intermediate_size
        self.w1 = nn.Linear(d, h, bias=False)
        self.w3 = nn.Linear(d, h, bias=False)
        self.w2 = nn.Linear(h, d, bias=False)

        # w1 and w3 as views of one [2h, d] weight (made after loading), so
        # that the CUDA path runs one GEMM and vLLM's silu_and_mul
        self.w13: torch.Tensor | None = None

    def merge_gate_up(self) -> None:
        w13 = torch.cat([self.w1.weight.data, self.w3.weight.data])
        h = self.w1.weight.shape[0]
        self.w1.weight.data, self.w3.weight.data = w13[:h], w13[h:]
        self.w13 = w13

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def forward_ops(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is None:
            self.merge_gate_up()
        gate_up = F.linear(x, self.w13)
        act = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
        torch.ops._C.silu_and_mul(act, gate_up)
        return self.w2(act)


class _FastBlock(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.attention = _FastAttention(config)
        self.feed_forward = _FastFeedForward(config)
        self.attention_norm = _FastRMSNorm(config.fast_dim, config.norm_eps)
        self.ffn_norm = _FastRMSNorm(config.fast_dim, config.norm_eps)

    def forward(self, x, start, table, cache):
        h = x + self.attention(self.attention_norm(x), start, table, cache)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_ops(self, resid, shape, start, positions, cos_sin, cache, delta):
        """``forward`` on CUDA with vLLM's fused ops (rms_norm,
        fused_add_rms_norm, rotary_embedding, silu_and_mul): about ten
        kernels per layer instead of fifty. ``resid`` [R*L, D] is the residual
        stream, updated in place; ``delta`` the previous block's output not
        yet added to it (None for the first block). Returns this block's
        feed-forward output, which the next block (or the final norm) adds."""
        eps = self.attention_norm.eps
        if delta is None:
            h = _ops_rms_norm(resid, self.attention_norm.weight, eps)
        else:
            # resid <- resid + delta; delta <- rms_norm(resid) * w
            w = self.attention_norm.weight
            torch.ops._C.fused_add_rms_norm(delta, resid, w, eps)
            h = delta
        attn = self.attention.forward_ops(
            h.view(shape), start, positions, cos_sin, cache, eps
        )
        torch.ops._C.fused_add_rms_norm(attn, resid, self.ffn_norm.weight, eps)
        return self.feed_forward.forward_ops(attn)


# --------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------


def _exp_noise(
    like: torch.Tensor, generators: dict[int, torch.Generator]
) -> torch.Tensor:
    q = torch.empty_like(like).exponential_(1)
    for i, g in generators.items():
        if i < q.shape[0]:
            q[i].exponential_(1, generator=g)
    return q


def _fish_penalize(
    logits: torch.Tensor, penalty: torch.Tensor, prev: torch.Tensor | None
) -> torch.Tensor:
    """fish-speech's windowed repetition penalty: each unique id of prev
    [R, P] once, ``s < 0 ? s * rp : s / rp``."""
    if prev is None:
        return logits
    prev = prev.long()
    score = torch.gather(logits, 1, prev)
    rp = penalty[:, None]
    score = torch.where(score < 0, score * rp, score / rp)
    return logits.scatter(1, prev, score)


def _fish_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """fish-speech ``logits_to_probs`` after the penalty: top-p on the
    untempered softmax (and, for S2, top-k) removes sorted positions, the
    top one always kept; then the temperature."""
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    cum = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum > top_p[:, None]
    if top_k is not None:
        ranks = torch.arange(logits.shape[-1], device=logits.device)[None]
        remove |= ranks >= top_k[:, None]
    remove[:, 0] = False
    remove = remove.scatter(1, sorted_idx, remove)
    logits = logits.masked_fill(remove, float("-inf"))
    logits = logits / torch.clamp(temperature, min=_SAMPLING_EPS)[:, None]
    return torch.softmax(logits, dim=-1)


def _race_draw(
    probs: torch.Tensor,
    greedy: torch.Tensor,
    argmax: torch.Tensor,
    generators: dict[int, torch.Generator],
) -> torch.Tensor:
    """``argmax(probs / Exp(1))`` as ``multinomial_sample_one_no_sync``;
    greedy rows keep ``argmax``."""
    sampled = torch.argmax(probs / _exp_noise(probs, generators), dim=-1)
    return torch.where(greedy, argmax, sampled)


def _fish_sample(
    logits: torch.Tensor,
    greedy: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    penalty: torch.Tensor,
    prev: torch.Tensor | None,
    generators: dict[int, torch.Generator],
    all_greedy: bool = False,
) -> torch.Tensor:
    """A batch of fish-speech ``sample`` calls: logits [R, V] fp32, per-row
    params [R], prev [R, P] ids to penalise. Greedy rows take the argmax
    after the penalty (what a vanishing top-p gives in the original)."""
    logits = _fish_penalize(logits, penalty, prev)
    out = logits.argmax(dim=-1)
    if all_greedy:
        return out
    probs = _fish_probs(logits, temperature, top_p)
    return _race_draw(probs, greedy, out, generators)


def _s2_sample(
    logits: torch.Tensor,
    greedy: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor | None,
    generators: dict[int, torch.Generator],
    all_greedy: bool = False,
) -> torch.Tensor:
    """S2 ``logits_to_probs`` (top-p or top-k, then the temperature) and the
    same draw. Greedy rows: argmax."""
    out = logits.argmax(dim=-1)
    if all_greedy:
        return out
    probs = _fish_probs(logits, temperature, top_p, top_k)
    return _race_draw(probs, greedy, out, generators)


def _sample_allowed(
    logits: torch.Tensor,
    ids: torch.Tensor,
    greedy: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor | None,
    generators: dict[int, torch.Generator],
    all_greedy: bool = False,
    fused: bool = False,
) -> torch.Tensor:
    """``_s2_sample`` of logits [R, V] restricted to the vocabulary ids
    ``ids`` (ascending), without sorting the whole vocabulary: the other
    entries would be -inf, which come last in the sort and add nothing to
    the softmax, and the ascending ids keep the ties' order. Returns
    vocabulary ids [R]. ``fused``: the Triton sampler (CUDA, <= 8192 ids)."""
    sub = logits.index_select(1, ids)
    picked = _s2_draw(
        sub, greedy, temperature, top_p, top_k, generators, all_greedy, fused
    )
    return ids[picked]


def _s2_draw(
    logits: torch.Tensor,
    greedy: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor | None,
    generators: dict[int, torch.Generator],
    all_greedy: bool,
    fused: bool,
) -> torch.Tensor:
    """``_s2_sample``, or the Triton sampler with the same noise (``fused``)."""
    if not fused:
        return _s2_sample(
            logits, greedy, temperature, top_p, top_k, generators, all_greedy
        )
    return fused_sample(
        logits,
        greedy,
        temperature,
        top_p,
        logits if all_greedy else _exp_noise(logits, generators),
        top_k=top_k,
        all_greedy=all_greedy,
        eps=_SAMPLING_EPS,
    )


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


class FishSpeechForCausalLM(nn.Module, FishSpeechTTSMixin):
    """Fish Speech dual-AR LM (``SupportsMultiCodebook``)."""

    supports_multi_codebook: ClassVar[Literal[True]] = True
    # Weights: `model.pth` (1.5 / S1 releases) or safetensors (S2, converted)
    allow_patterns_overrides: ClassVar[list[str]] = ["*.safetensors", "model.pth"]

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        if get_pp_group().world_size > 1:
            raise NotImplementedError("Fish Speech does not support pipeline parallel")
        self.config = config
        self.version: str = getattr(config, "fish_version", "s1")
        self.num_codebooks: int = config.num_codebooks
        self.codebook_size: int = config.codebook_size
        self.num_aux_codebooks = config.num_codebooks - 1
        # 1.5/S1: the window skips the first generated frame (see
        # sample_codebooks), so one more frame than the original's 16.
        self.codebook_history_window = (
            _S2_RAS_WINDOW if self.version == "s2" else _FISH_WINDOW
        ) + 1
        self._resolve_special_ids(config, vllm_config.model_config)

        self.model = FishSlowTransformer(
            vllm_config=vllm_config, prefix=f"{prefix}.model" if prefix else "model"
        )
        if config.tie_word_embeddings:
            self.output = self.model.embeddings
        else:
            self.output = ParallelLMHead(
                config.vocab_size,
                config.dim,
                quant_config=vllm_config.quant_config,
                prefix=f"{prefix}.output" if prefix else "output",
            )
        self.logits_processor = LogitsProcessor(config.vocab_size)

        self._init_fast_transformer(
            config, torch.device(vllm_config.device_config.device)
        )
        # Slow head over the semantic slice + <|im_end|> only (the other rows
        # get -inf): S2 restricts sampling to them anyway; for 1.5/S1 it is an
        # opt-in (hf_overrides {"semantic_only_head": true}) since the
        # originals sample the whole vocabulary.
        self.semantic_only_head = (
            bool(
                getattr(config, "semantic_only_head", None)
                if getattr(config, "semantic_only_head", None) is not None
                else self.version == "s2"
            )
            and get_tensor_model_parallel_world_size() == 1
        )
        # The fast loop as CUDA graphs (GPU, not enforce_eager).
        self._fast_graphs: dict[bool, FastLoopGraphs] | None = None
        if (
            not vllm_config.model_config.enforce_eager
            and vllm_config.device_config.device.type == "cuda"
        ):
            # Opt-in (hf_overrides {"fuse_fast_loop": true, "fused_fast_block":
            # false}): torch.compile the torch loop before capture. Correct on
            # an H100 (graph == eager); it compiles in the profiling run.
            fuse = bool(getattr(config, "fuse_fast_loop", False))
            if fuse and self.fused_fast_block:
                logger.info(
                    "Fish Speech: fuse_fast_loop is ignored with fused_fast_block "
                    "(the fused ops are not traced by torch.compile)"
                )
                fuse = False
            self._fast_graphs = {
                False: FastLoopGraphs(self._fast_loop_sampled, compile=fuse),
                True: FastLoopGraphs(self._fast_loop_greedy, compile=fuse),
            }
        self.scale_codebook_embeddings = bool(
            getattr(config, "scale_codebook_embeddings", False)
        )

    def _init_fast_transformer(self, config, device: torch.device) -> None:
        """The fast transformer's modules and buffers (also used alone by
        tools/fish_fast_loop.py for tests and benchmarks of the loop)."""
        if config.fast_dim != config.dim:
            self.fast_project_in: nn.Module = nn.Linear(config.dim, config.fast_dim)
        else:
            self.fast_project_in = nn.Identity()
        self.fast_embeddings = nn.Embedding(config.codebook_size, config.fast_dim)
        self.fast_layers = nn.ModuleList(
            _FastBlock(config) for _ in range(config.n_fast_layer)
        )
        self.fast_norm = _FastRMSNorm(config.fast_dim, config.norm_eps)
        self.fast_output = nn.Linear(config.fast_dim, config.codebook_size, bias=False)
        self.register_buffer(
            "fast_rope",
            fish_rope_table(
                config.num_codebooks, config.fast_head_dim, float(config.rope_base)
            ),
            persistent=False,
        )
        self.norm_fastlayer_input = bool(getattr(config, "norm_fastlayer_input", False))
        self.register_buffer(
            "fast_positions", torch.arange(config.num_codebooks), persistent=False
        )
        self._fast_cos_sin_cache: dict[torch.dtype, torch.Tensor] = {}
        self._s2_ids_cache: dict[torch.device, torch.Tensor] = {}
        # On CUDA by default (hf_overrides {"fused_fast_block": false} /
        # {"fused_fast_sampler": false} turn them off): the fast layers on
        # vLLM's fused ops with one Triton decode-attention launch per
        # position, and each codebook sampled by one Triton launch instead
        # of about twenty torch kernels. Elsewhere the torch path runs.
        want_block = getattr(config, "fused_fast_block", None)
        want_sampler = getattr(config, "fused_fast_sampler", None)
        self.fused_fast_block = want_block is not False and (
            fused_fast_block_available(device)
        )
        self.fused_fast_sampler = want_sampler is not False and (
            fused_sample_available(device)
        )
        if self.fused_fast_block and decode_attention_available(device):
            for layer in self.fast_layers:
                layer.attention.decode_kernel = True
        for name, want, got in (
            ("fused_fast_block", want_block, self.fused_fast_block),
            ("fused_fast_sampler", want_sampler, self.fused_fast_sampler),
        ):
            if want is True and not got:
                logger.warning(
                    "Fish Speech: %s was asked for but its kernels are not "
                    "available on %s; the torch path runs instead",
                    name,
                    device,
                )

    # ---- config helpers ----

    def _resolve_special_ids(self, config, model_config: ModelConfig) -> None:
        sb = getattr(config, "semantic_begin_id", None)
        se = getattr(config, "semantic_end_id", None)
        im_end = getattr(config, "im_end_id", None)
        if sb is None or se is None or im_end is None:
            from vllm.tokenizers.fish_speech import fish_special_ids

            tok_dir = Path(model_config.tokenizer)
            if not (tok_dir / "tokenizer.tiktoken").is_file():
                raise ValueError(
                    f"Fish Speech: {tok_dir} has no tokenizer.tiktoken and the "
                    "config has no semantic_begin_id/semantic_end_id/im_end_id"
                )
            sb, se, im_end = fish_special_ids(tok_dir)
            config.semantic_begin_id, config.semantic_end_id = sb, se
            config.im_end_id = im_end
        if se >= config.vocab_size:
            raise ValueError(
                f"Fish Speech: semantic tokens end at id {se}, outside the "
                f"vocabulary of {config.vocab_size}"
            )
        self.semantic_begin_id, self.semantic_end_id = int(sb), int(se)
        self.im_end_id = int(im_end)

    @classmethod
    def get_aux_codebook_sizes(cls, model_config: ModelConfig) -> list[int]:
        cfg = model_config.hf_config
        return [cfg.codebook_size] * (cfg.num_codebooks - 1)

    # ---- slow model ----

    def embed_input_ids(
        self, input_ids: torch.Tensor, aux_codes: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.model.embeddings(input_ids)
        ids = input_ids.long()
        is_sem = (ids >= self.semantic_begin_id) & (ids <= self.semantic_end_id)
        c0 = torch.where(is_sem, ids - self.semantic_begin_id, 0)
        if aux_codes is None:
            aux_codes = ids.new_zeros(ids.shape[0], self.num_aux_codebooks)
        codes = torch.cat([c0[:, None], aux_codes.to(ids.device).long()], dim=1)
        table = self.model.codebook_embeddings
        if get_tensor_model_parallel_world_size() == 1:
            # one launch on CUDA (_speech_C), the torch reference elsewhere;
            # both accumulate the K rows in fp32
            vq = codebook_embedding_sum(codes, table.weight, self.codebook_size)
        else:
            # vocab-sharded table: the parallel embedding all-reduces the rows
            offsets = torch.arange(self.num_codebooks, device=ids.device)
            vq = table((codes + offsets * self.codebook_size).reshape(-1))
            vq = vq.view(ids.shape[0], self.num_codebooks, -1).sum(dim=1)
        x = x + torch.where(is_sem[:, None], vq, torch.zeros_like(vq))
        if self.scale_codebook_embeddings:
            x = torch.where(is_sem[:, None], x / math.sqrt(self.num_codebooks + 1), x)
        return x

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        hidden_states = self.model.norm(hidden_states)
        if not self.semantic_only_head:
            return self.logits_processor(self.output, hidden_states)
        # semantic ids are contiguous: one GEMM over that slice, one row for
        # <|im_end|>; the rest of the vocabulary is -inf
        w = self.output.weight
        begin, end = self.semantic_begin_id, self.semantic_end_id
        im_end = self.im_end_id
        logits = hidden_states.new_full(
            (hidden_states.shape[0], self.config.vocab_size), float("-inf")
        )
        logits[:, begin : end + 1] = F.linear(hidden_states, w[begin : end + 1])
        logits[:, im_end] = F.linear(hidden_states, w[im_end : im_end + 1])[:, 0]
        return logits

    # ---- fast model ----

    def fast_logits(self, x: torch.Tensor, start: int, caches: list) -> torch.Tensor:
        """Run positions [start, start+L) of x [R, L, fast_dim]; fp32 logits
        of the last position [R, codebook_size]."""
        if self.fused_fast_block:
            rows, seqlen, _ = x.shape
            positions = None  # not read by the decode-attention kernel
            if seqlen > 1 or not self.fast_layers[0].attention.decode_kernel:
                positions = self.fast_positions[start : start + seqlen].repeat(rows)
            cos_sin = self._fast_cos_sin(x.dtype)
            # x is a fresh tensor of the loop: it becomes the residual stream
            resid = x.contiguous().view(rows * seqlen, -1)
            delta = None
            for layer, cache in zip(self.fast_layers, caches):
                delta = layer.forward_ops(
                    resid, x.shape, start, positions, cos_sin, cache, delta
                )
            torch.ops._C.fused_add_rms_norm(
                delta, resid, self.fast_norm.weight, self.fast_norm.eps
            )
            last = delta.view(rows, seqlen, -1)[:, -1]
            return self.fast_output(last).float()
        for layer, cache in zip(self.fast_layers, caches):
            x = layer(x, start, self.fast_rope, cache)
        return self.fast_output(self.fast_norm(x[:, -1])).float()

    def _fast_cos_sin(self, dtype: torch.dtype) -> torch.Tensor:
        """The fast RoPE table as vLLM's rotary_embedding reads it: [K, D]
        (cos half, sin half) in the activation dtype."""
        table = self._fast_cos_sin_cache.get(dtype)
        if table is None:
            rope = self.fast_rope
            table = torch.cat([rope[..., 0], rope[..., 1]], dim=-1).to(dtype)
            self._fast_cos_sin_cache[dtype] = table
        return table

    def _new_fast_caches(self, rows: int, like: torch.Tensor) -> list:
        cfg = self.config
        shape = (rows, cfg.fast_n_local_heads, cfg.num_codebooks, cfg.fast_head_dim)
        return [
            (like.new_zeros(shape), like.new_zeros(shape)) for _ in self.fast_layers
        ]

    def fast_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.norm_fastlayer_input:
            hidden_states = self.model.norm(hidden_states)
        return self.fast_project_in(hidden_states)

    # ---- sampling ----

    def sample_codebooks(
        self,
        logits: torch.Tensor,
        hidden_states: torch.Tensor,
        sampling_metadata: SamplingMetadata,
        history: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        md = sampling_metadata
        rows = logits.shape[0]
        dev = logits.device
        logits = logits.float()
        if md.temperature is None or md.all_greedy:
            temperature = torch.zeros(rows, device=dev)
        else:
            temperature = md.temperature[:rows].float()
        greedy = temperature < _SAMPLING_EPS
        all_greedy = bool(md.all_greedy) or md.temperature is None  # no sync
        top_p = (
            md.top_p[:rows].float()
            if md.top_p is not None
            else torch.ones(rows, device=dev)
        )
        top_k = md.top_k[:rows] if md.top_k is not None else None
        penalty = md.repetition_penalties[:rows].float()
        generators = md.generators
        history = history.to(dev).long()

        if self.version == "s2":
            return self._sample_s2(
                logits,
                hidden_states,
                history,
                greedy,
                temperature,
                top_p,
                top_k,
                generators,
                all_greedy,
            )

        if self.version == "s1":
            # S1's generate() casts the sampling params to bf16
            temperature = temperature.to(torch.bfloat16).float()
            top_p = top_p.to(torch.bfloat16).float()
            penalty = penalty.to(torch.bfloat16).float()

        # Window of the original decode_n_tokens: frames (tok, c0, c1..) of the
        # generated frames *after* the first one, zero-filled, 16 columns.
        # history [R, 17, K]: -1 padded at the end; column 0 is the first
        # frame while fewer than 17 frames exist, so columns 1..16 are the
        # original's window in every case.
        valid = history[..., 0] >= 0
        hist = torch.where(valid[..., None], history, 0)
        c0 = (hist[..., 0] - self.semantic_begin_id).clamp(min=0)
        c0 = torch.where(valid, c0, 0)
        frames = torch.cat([hist[..., :1], c0[..., None], hist[..., 1:]], dim=-1)
        window = frames[:, 1 : 1 + _FISH_WINDOW]  # [R, 16, N+1]
        # No penalty for the first generated frame (sampled at prefill)
        has_prev = valid[:, 0]
        penalty = torch.where(has_prev, penalty, torch.ones_like(penalty))

        # S1: window column 0 (one frame, all rows); 1.5: the main-token row
        slow_prev = window[:, 0, :] if self.version == "s1" else window[:, :, 0]
        main = _fish_sample(
            logits,
            greedy,
            temperature,
            top_p,
            penalty,
            slow_prev,
            generators,
            all_greedy,
        )

        c0_new = (main - self.semantic_begin_id).clamp(0, self.codebook_size - 1)
        aux = self._run_fast(
            hidden_states,
            c0_new,
            greedy,
            temperature,
            top_p,
            penalty,
            None,
            window,
            generators,
            all_greedy,
        )
        return main.long(), aux.long()

    def _fast_loop(
        self,
        hidden: torch.Tensor,
        c0: torch.Tensor,
        greedy: torch.Tensor,
        temperature: torch.Tensor,
        top_p: torch.Tensor,
        penalty: torch.Tensor,
        top_k: torch.Tensor,
        window: torch.Tensor,
        all_greedy: bool = False,
        generators: dict[int, torch.Generator] | None = None,
    ) -> torch.Tensor:
        """The residual codes [R, N-1] of one frame: the fast transformer over
        (hidden, codebook 0, 1, ...) with each family's sampler. Tensor-only
        and free of host syncs, so that it can be captured in a CUDA graph."""
        generators = generators or {}
        rows = hidden.shape[0]
        x0 = self.fast_input(hidden)
        caches = self._new_fast_caches(rows, x0)
        x = torch.stack([x0, self.fast_embeddings(c0)], dim=1)
        s2 = self.version == "s2"
        lim = _S1_RESIDUAL_CODES if self.version == "s1" else self.codebook_size
        codes, pos = [], 0
        for k in range(1, self.num_codebooks):
            lg = self.fast_logits(x, pos, caches)[:, :lim]
            pos += x.shape[1]
            if s2:
                ck = _s2_draw(
                    lg,
                    greedy,
                    temperature,
                    top_p,
                    top_k,
                    generators,
                    all_greedy,
                    self.fused_fast_sampler,
                )
            elif self.fused_fast_sampler:
                ck = fused_sample(
                    lg,
                    greedy,
                    temperature,
                    top_p,
                    lg if all_greedy else _exp_noise(lg, generators),
                    penalty=penalty,
                    prev=window[:, :, k + 1],
                    all_greedy=all_greedy,
                    eps=_SAMPLING_EPS,
                )
            else:
                ck = _fish_sample(
                    lg,
                    greedy,
                    temperature,
                    top_p,
                    penalty,
                    window[:, :, k + 1],
                    generators,
                    all_greedy,
                )
            codes.append(ck)
            x = self.fast_embeddings(ck)[:, None]
        return torch.stack(codes, dim=1) if codes else c0.new_zeros(rows, 0)

    def _fast_loop_sampled(self, *args: torch.Tensor) -> torch.Tensor:
        return self._fast_loop(*args, all_greedy=False)

    def _fast_loop_greedy(self, *args: torch.Tensor) -> torch.Tensor:
        return self._fast_loop(*args, all_greedy=True)

    def _run_fast(
        self,
        hidden,
        c0,
        greedy,
        temperature,
        top_p,
        penalty,
        top_k,
        window,
        generators,
        all_greedy,
    ) -> torch.Tensor:
        """The fast loop, replayed from a CUDA graph when possible (no seeded
        requests in the batch), else eagerly."""
        if top_k is None:
            top_k = torch.full_like(c0, self.codebook_size)
        args = (hidden, c0, greedy, temperature, top_p, penalty, top_k.long(), window)
        if (
            self._fast_graphs is not None
            and not generators
            and not torch.cuda.is_current_stream_capturing()
        ):
            out = self._fast_graphs[bool(all_greedy)](*args)
            if out is not None:
                return out
        return self._fast_loop(*args, all_greedy=all_greedy, generators=generators)

    def _sample_s2(
        self,
        logits,
        hidden_states,
        history,
        greedy,
        temperature,
        top_p,
        top_k,
        generators,
        all_greedy=False,
    ):
        """S2 ``decode_one_token_ar``: slow token limited to the semantic ids
        and ``<|im_end|>``; repetition-aware sampling (a semantic token found
        among the main tokens of the last 10 frames *after the first one* is
        replaced by a draw at temperature 1.0 / top-p 0.9, same top-k; not for
        greedy rows); fast codebooks with the same temperature/top-p/top-k.
        S2's ``generate`` casts temperature and top-p to the model dtype."""
        mdtype = self.fast_output.weight.dtype
        temperature = temperature.to(mdtype).float()
        top_p = top_p.to(mdtype).float()
        ids = self._s2_allowed_ids(logits.device)
        fused = self.fused_fast_sampler and ids.numel() <= FUSED_SAMPLE_MAX_VOCAB
        main = _sample_allowed(
            logits,
            ids,
            greedy,
            temperature,
            top_p,
            top_k,
            generators,
            all_greedy,
            fused,
        )
        # history [R, 11, K]: column 0 is the first generated frame (sampled at
        # prefill), which the original's rolling window never holds.
        recent = history[:, 1 : 1 + _S2_RAS_WINDOW, 0]
        is_sem = (main >= self.semantic_begin_id) & (main <= self.semantic_end_id)
        repeated = is_sem & (recent == main[:, None]).any(dim=1) & ~greedy
        if not all_greedy:
            alt = _sample_allowed(
                logits,
                ids,
                torch.zeros_like(greedy),
                torch.ones_like(temperature),
                torch.full_like(top_p, 0.9).to(mdtype).float(),
                top_k,
                generators,
                fused=fused,
            )
            main = torch.where(repeated, alt, main)
        c0 = (main - self.semantic_begin_id).clamp(0, self.codebook_size - 1)
        codes = self._run_fast(
            hidden_states,
            c0,
            greedy,
            temperature,
            top_p,
            torch.ones_like(temperature),
            top_k,
            history[:, :1, :1],
            generators,
            all_greedy,
        )
        return main.long(), codes.long()

    def _s2_allowed_ids(self, device: torch.device) -> torch.Tensor:
        """The ids S2 samples the slow token from (ascending): the semantic
        range and ``<|im_end|>``."""
        ids = self._s2_ids_cache.get(device)
        if ids is None:
            ids = (
                torch.cat(
                    [
                        torch.arange(self.semantic_begin_id, self.semantic_end_id + 1),
                        torch.tensor([self.im_end_id]),
                    ]
                )
                .unique(sorted=True)
                .to(device)
            )
            self._s2_ids_cache[device] = ids
        return ids

    # ---- weights ----

    _SLOW_PREFIXES = ("embeddings.", "codebook_embeddings.", "layers.", "norm.")

    @staticmethod
    def _remap_release_names(
        weights: Iterable[tuple[str, torch.Tensor]],
    ) -> Iterable[tuple[str, torch.Tensor]]:
        """Original loaders' renames: unwrap ``state_dict``, strip
        ``model.``, drop ``audio_`` keys (1.5/S1); S2 safetensors names."""
        first = True
        strip_model = False
        for name, tensor in weights:
            if name == "state_dict" and isinstance(tensor, dict):
                yield from FishSpeechForCausalLM._remap_release_names(tensor.items())
                continue
            if first:
                strip_model = name.startswith("model.")
                first = False
            if name.startswith("text_model.model."):
                name = name[len("text_model.model.") :]
            elif name.startswith("text_model."):
                name = name[len("text_model.") :]
            elif name.startswith("audio_decoder."):
                suffix = name[len("audio_decoder.") :]
                if suffix.startswith("codebook_embeddings."):
                    name = suffix
                elif suffix.startswith(("fast_project_in.", "project_in.")):
                    name = "fast_project_in." + suffix.split(".", 1)[1]
                else:
                    name = "fast_" + suffix
            elif strip_model:
                name = name.replace("model.", "")
            if "audio_" in name:
                continue
            yield name, tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters(remove_duplicate=False))
        if self.config.tie_word_embeddings:
            params.pop("output.weight", None)
        loaded: set[str] = set()
        fast_split: dict[str, dict[str, torch.Tensor]] = {}
        unexpected: list[str] = []
        for name, w in self._remap_release_names(weights):
            target = "model." + name if name.startswith(self._SLOW_PREFIXES) else name
            shard = None
            if target.startswith("model.layers."):
                if (
                    ".attention.wq." in target
                    or ".attention.wk." in target
                    or (".attention.wv." in target)
                ):
                    shard = target.split(".attention.w", 1)[1][0]
                    target = target.replace(f".attention.w{shard}.", ".attention.wqkv.")
                elif ".feed_forward.w1." in target:
                    shard, target = 0, target.replace(".w1.", ".w13.")
                elif ".feed_forward.w3." in target:
                    shard, target = 1, target.replace(".w3.", ".w13.")
            elif target.startswith("fast_layers.") and any(
                f".attention.w{s}." in target for s in "qkv"
            ):
                s = target.split(".attention.w", 1)[1][0]
                key = target.replace(f".attention.w{s}.", ".attention.wqkv.")
                fast_split.setdefault(key, {})[s] = w
                continue
            param = params.get(target)
            if param is None:
                unexpected.append(name)
                continue
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                if loader is default_weight_loader and param.shape != w.shape:
                    raise ValueError(
                        f"Fish Speech checkpoint: {name} has shape "
                        f"{tuple(w.shape)}, the model expects {tuple(param.shape)}"
                    )
                loader(param, w)
            else:
                loader(param, w, shard)
            loaded.add(target)
        for key, parts in fast_split.items():
            if set(parts) != {"q", "k", "v"} or key not in params:
                raise ValueError(f"Fish Speech checkpoint: incomplete {key} (wq/wk/wv)")
            default_weight_loader(
                params[key], torch.cat([parts["q"], parts["k"], parts["v"]])
            )
            loaded.add(key)
        if unexpected:
            logger.warning(
                "Fish Speech checkpoint: %d unused tensors (e.g. %s)",
                len(unexpected),
                unexpected[:5],
            )
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(
                f"Fish Speech checkpoint is missing {len(missing)} weights, e.g. "
                f"{missing[:8]}; is this a Fish Speech dual-AR release directory?"
            )
        if self.config.tie_word_embeddings:
            loaded.add("output.weight")
        if self.fused_fast_block:
            for layer in self.fast_layers:
                layer.feed_forward.merge_gate_up()
        return loaded
