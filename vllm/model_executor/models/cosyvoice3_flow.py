# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Flow-matching decoder of CosyVoice3 (speech tokens at 25 Hz -> mel 50 Hz).

A plain-PyTorch implementation of CosyVoice3's ``CausalMaskedDiffWithDiT``:

* token embedding (``[vocab, 80]``) -> ``PreLookaheadLayer(80, 1024, 3)``
  (a conv over the next 3 tokens, then a causal conv, residual) -> each
  frame repeated ``token_mel_ratio`` (2) times: the condition ``mu``, with
  no encoder;
* the CFM of CosyVoice2 (Euler, cosine time schedule, classifier-free
  guidance 0.7, the fixed seed-0 noise) over a ``DiT`` velocity estimator:
  input projection of ``[x, cond, mu, spk]`` + a causal conv position
  embedding, ``depth`` AdaLayerNormZero transformer blocks with rotary
  positions, a final AdaLayerNorm and a linear head.

The rotary embedding follows ``x_transformers``' ``apply_rotary_pos_emb`` as
the original calls it: on the ``[B, T, heads * dim_head]`` projections,
before the split into heads, so only the first ``dim_head`` channels (head
0) are rotated, in interleaved pairs (2i, 2i+1) with frequency
``10000 ** (-2i / dim_head)``; the other heads get no position signal there.

Module and parameter names follow the original so that a released
``flow.pt`` loads with ``strict=True`` (including the rotary ``inv_freq``
buffer, which the original stores).
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from vllm.model_executor.models.cosyvoice_flow import (
    _NOISE_FRAMES,
    _NOISE_SEED,
    CausalConditionalCFM,
    FlowBatch,
    PreLookaheadLayer,
    TokenMelFlow,
    _chunk_mask,
)
from vllm.model_executor.models.cosyvoice_hift import load_strict

# The original's Euler solver hard-codes 80 mel bins.
_N_MELS = 80


# ------------------------------------------------------------------ config --
@dataclass
class DiTConfig:
    """``flow.decoder.estimator`` of ``cosyvoice3.yaml`` (``DiT``)."""

    dim: int = 1024
    depth: int = 22
    heads: int = 16
    dim_head: int = 64
    ff_mult: float = 2
    mel_dim: int = 80
    mu_dim: int = 80
    spk_dim: int = 80
    out_channels: int = 80
    static_chunk_size: int = 50
    num_decoding_left_chunks: int = -1  # unused by the original's mask
    long_skip_connection: bool = False
    freq_embed_dim: int = 256  # TimestepEmbedding default
    conv_pos_kernel: int = 31  # CausalConvPositionEmbedding defaults
    conv_pos_groups: int = 16


@dataclass
class CosyVoice3FlowConfig:
    """``flow`` section of ``cosyvoice3.yaml`` (defaults: the CV3 release)."""

    input_size: int = 80
    output_size: int = 80
    spk_embed_dim: int = 192
    vocab_size: int = 6561
    input_frame_rate: int = 25
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    pre_lookahead_channels: int = 1024
    inference_cfg_rate: float = 0.7
    t_scheduler: str = "cosine"
    n_timesteps: int = 10  # fixed in CausalMaskedDiffWithDiT.inference
    estimator: DiTConfig = field(default_factory=DiTConfig)

    def __post_init__(self) -> None:
        est = self.estimator
        if self.output_size != _N_MELS or est.mel_dim != _N_MELS:
            raise ValueError(
                f"flow: output_size/mel_dim must be {_N_MELS} (the original's "
                f"solver hard-codes it), got {self.output_size}/{est.mel_dim}"
            )
        if est.mu_dim != self.input_size:
            raise ValueError(
                f"flow: estimator mu_dim {est.mu_dim} != input_size "
                f"{self.input_size} (mu is the pre-lookahead output)"
            )
        if est.spk_dim not in (0, self.output_size):
            raise ValueError(
                f"flow: estimator spk_dim {est.spk_dim} != output_size "
                f"{self.output_size}"
            )
        if est.dim % est.conv_pos_groups:
            raise ValueError(
                f"flow: DiT dim {est.dim} not divisible by the conv position "
                f"embedding's {est.conv_pos_groups} groups"
            )
        if est.dim_head % 2 or est.heads < 1:
            raise ValueError(f"flow: bad DiT heads/dim_head {est.heads}/{est.dim_head}")
        if self.t_scheduler not in ("cosine", "linear"):
            raise ValueError(f"flow: unknown t_scheduler {self.t_scheduler!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CosyVoice3FlowConfig":
        """Build from the (tag-free) ``flow`` mapping of the yaml."""
        d = dict(d)
        if "encoder" in d and d["encoder"] is not None:
            raise ValueError(
                "flow: has an encoder; this is a CosyVoice2 flow "
                "(CausalMaskedDiffWithXvec), not CosyVoice3's"
            )
        pre = dict(d.pop("pre_lookahead_layer", None) or {})
        dec = dict(d.pop("decoder", None) or {})
        est = dict(dec.pop("estimator", None) or {})
        cfm = dict(dec.pop("cfm_params", None) or {})
        cfm = dict(cfm.get("content", cfm))  # !new:omegaconf.DictConfig
        kw: dict[str, Any] = {
            k: v
            for k, v in d.items()
            if k in cls.__dataclass_fields__ and k != "estimator"
        }
        input_size = int(kw.get("input_size", 80))
        if int(pre.get("in_channels", input_size)) != input_size:
            raise ValueError("flow: pre_lookahead_layer.in_channels != input_size")
        if "channels" in pre:
            kw["pre_lookahead_channels"] = int(pre["channels"])
        if "pre_lookahead_len" in pre:
            # the layer's own value is the one used (the flow's only slices)
            n = int(pre["pre_lookahead_len"])
            if n != int(kw.get("pre_lookahead_len", n)):
                raise ValueError(
                    "flow: pre_lookahead_layer.pre_lookahead_len != pre_lookahead_len"
                )
            kw["pre_lookahead_len"] = n
        if "inference_cfg_rate" in cfm:
            kw["inference_cfg_rate"] = float(cfm["inference_cfg_rate"])
        if "t_scheduler" in cfm:
            kw["t_scheduler"] = str(cfm["t_scheduler"])
        if "solver" in cfm and cfm["solver"] != "euler":
            raise ValueError(f"flow: unsupported solver {cfm['solver']!r}")
        skw = {k: est[k] for k in DiTConfig.__dataclass_fields__ if k in est}
        if skw.get("spk_dim") is None:
            skw["spk_dim"] = 0
        if skw.get("mu_dim") is None:
            skw["mu_dim"] = skw.get("mel_dim", 80)
        kw["estimator"] = DiTConfig(**skw)
        return cls(**kw)


def release_rng_after_flow(cfg: CosyVoice3FlowConfig) -> torch.Generator:
    """The global RNG state of the original right after it has built the
    flow from a release yaml (and so right before the HiFT).

    The flow's CFM seeds 0 and draws its fixed noise; the DiT and the
    pre-lookahead layer are built before it (their draws are lost to that
    reseed); after it, the flow's token embedding (normal) and speaker
    projection (uniform) take their default init.
    """
    g = torch.Generator().manual_seed(_NOISE_SEED)
    torch.randn(1, _N_MELS, _NOISE_FRAMES, generator=g)
    torch.empty(cfg.vocab_size, cfg.input_size).normal_(generator=g)
    torch.empty(cfg.output_size, cfg.spk_embed_dim).uniform_(generator=g)
    torch.empty(cfg.output_size).uniform_(generator=g)
    return g


# --------------------------------------------------------------- modules --
class LookaheadLayer(PreLookaheadLayer):
    """CosyVoice3's ``PreLookaheadLayer(in_channels, channels, n)``: the
    CosyVoice2 layer (same forward) with a wider hidden width."""

    def __init__(self, in_channels: int, channels: int, pre_lookahead_len: int):
        super().__init__(in_channels, pre_lookahead_len)
        self.conv1 = nn.Conv1d(in_channels, channels, pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(channels, in_channels, 3)


class TimestepEmbedding(nn.Module):
    """Sinusoidal (scale 1000) time features -> MLP (``time_mlp``)."""

    def __init__(self, dim: int, freq_embed_dim: int = 256):
        super().__init__()
        self.freq_embed_dim = freq_embed_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(freq_embed_dim, dim), nn.SiLU(), nn.Linear(dim, dim)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_embed_dim // 2
        freq = torch.exp(
            torch.arange(half, device=t.device).float()
            * -(math.log(10000) / (half - 1))
        )
        arg = 1000 * t[:, None].float() * freq[None]
        emb = torch.cat([arg.sin(), arg.cos()], dim=-1).to(t.dtype)
        return self.time_mlp(emb)


class CausalConvPositionEmbedding(nn.Module):
    """Two left-padded grouped convs (k=31, 16 groups) with Mish."""

    def __init__(self, dim: int, kernel_size: int = 31, groups: int = 16):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv1 = nn.Sequential(
            nn.Conv1d(dim, dim, kernel_size, groups=groups), nn.Mish()
        )
        self.conv2 = nn.Sequential(
            nn.Conv1d(dim, dim, kernel_size, groups=groups), nn.Mish()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, T, D]."""
        pad = (self.kernel_size - 1, 0)
        h = self.conv1(F.pad(x.transpose(1, 2), pad))
        h = self.conv2(F.pad(h, pad))
        return h.transpose(1, 2)


class InputEmbedding(nn.Module):
    def __init__(self, mel_dim: int, mu_dim: int, spk_dim: int, cfg: DiTConfig):
        super().__init__()
        self.spk_dim = spk_dim
        self.proj = nn.Linear(mel_dim * 2 + mu_dim + spk_dim, cfg.dim)
        self.conv_pos_embed = CausalConvPositionEmbedding(
            cfg.dim, cfg.conv_pos_kernel, cfg.conv_pos_groups
        )

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        mu: torch.Tensor,
        spks: torch.Tensor,
    ) -> torch.Tensor:
        """x/cond/mu [B, T, C], spks [B, S] -> [B, T, dim]."""
        parts = [x, cond, mu]
        if self.spk_dim > 0:
            parts.append(spks[:, None, :].expand(-1, x.shape[1], -1))
        h = self.proj(torch.cat(parts, dim=-1))
        return self.conv_pos_embed(h) + h


class RotaryEmbedding(nn.Module):
    """x_transformers' rotary table; ``inv_freq`` is a (saved) buffer."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, dim / 2] (float32)."""
        t = torch.arange(seq_len, device=self.inv_freq.device).float()
        freqs = t[:, None] * self.inv_freq.float()[None]
        return freqs.cos(), freqs.sin()


def _rotate_leading(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of the first ``2 * cos.shape[-1]``
    channels of x [B, T, C]; the rest pass unchanged (the original's
    partial rotary on the un-split projection)."""
    rot = 2 * cos.shape[-1]
    xr = x[..., :rot].float().unflatten(-1, (rot // 2, 2))
    x1, x2 = xr[..., 0], xr[..., 1]
    out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.cat([out.flatten(-2).to(x.dtype), x[..., rot:]], dim=-1)


class AdaLayerNormZero(nn.Module):
    """LayerNorm modulated by the time embedding; also returns the gates
    and the FFN modulation (shift, scale, gate)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim * 6)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.linear(
            F.silu(emb)
        ).chunk(6, dim=1)
        x = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        return x, gate, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroFinal(nn.Module):
    """Final modulation: (scale, shift) from the time embedding."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim * 2)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(emb)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Self-attention with biased q/k/v projections and the partial
    (head 0 only) rotary of the original."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        keep: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """x [B, T, D]; mask [B, 1|T, T] bool (True = may attend); keep
        [B, T, 1] bool (frames whose output is kept, others zeroed)."""
        b, t, _ = x.shape
        cos, sin = rope
        q = _rotate_leading(self.to_q(x), cos, sin)
        k = _rotate_leading(self.to_k(x), cos, sin)
        v = self.to_v(x)

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(q), heads(k), heads(v), attn_mask=mask[:, None]
        )
        out = self.to_out[0](out.transpose(1, 2).reshape(b, t, -1))
        return out.masked_fill(~keep, 0.0)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: float):
        super().__init__()
        inner = int(dim * mult)
        self.ff = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner), nn.GELU(approximate="tanh")),
            nn.Identity(),  # dropout
            nn.Linear(inner, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: float):
        super().__init__()
        self.attn_norm = AdaLayerNormZero(dim)
        self.attn = Attention(dim, heads, dim_head)
        self.ff_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, ff_mult)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        mask: torch.Tensor,
        keep: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        h, gate, shift_mlp, scale_mlp, gate_mlp = self.attn_norm(x, t)
        x = x + gate[:, None] * self.attn(h, mask, keep, rope)
        h = self.ff_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp[:, None] * self.ff(h)


class DiT(nn.Module):
    """The velocity estimator (``cosyvoice.flow.DiT.dit.DiT``)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed = TimestepEmbedding(cfg.dim, cfg.freq_embed_dim)
        self.input_embed = InputEmbedding(cfg.mel_dim, cfg.mu_dim, cfg.spk_dim, cfg)
        self.rotary_embed = RotaryEmbedding(cfg.dim_head)
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(cfg.dim, cfg.heads, cfg.dim_head, cfg.ff_mult)
            for _ in range(cfg.depth)
        )
        self.long_skip_connection = (
            nn.Linear(cfg.dim * 2, cfg.dim, bias=False)
            if cfg.long_skip_connection
            else None
        )
        self.norm_out = AdaLayerNormZeroFinal(cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, cfg.mel_dim)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        streaming: bool = False,
    ) -> torch.Tensor:
        """x/mu/cond [B, C, T], mask [B, 1, T], t [B], spks [B, S] ->
        velocity [B, 80, T]."""
        b, _, n = x.shape
        if t.dim() == 0:
            t = t.expand(b)
        temb = self.time_embed(t)
        h = self.input_embed(
            x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2), spks
        )
        rope = self.rotary_embed(n)
        attn = _chunk_mask(
            mask.bool(), self.cfg.static_chunk_size if streaming else 0
        )  # [B, 1|T, T]
        keep = attn[:, -1, :, None]  # the original keeps rows by the last row
        residual = h
        for block in self.transformer_blocks:
            h = block(h, temb, attn, keep, rope)
        if self.long_skip_connection is not None:
            h = self.long_skip_connection(torch.cat([h, residual], dim=-1))
        h = self.norm_out(h, temb)
        return self.proj_out(h).transpose(1, 2)


class DiTConditionalCFM(CausalConditionalCFM):
    """CosyVoice2's causal CFM (Euler + CFG, fixed seed-0 noise) driving the
    DiT estimator. Holds no parameters of its own (``decoder.estimator.*``
    in the state dict)."""

    def __init__(self, cfg: CosyVoice3FlowConfig):
        # The parent builds the CosyVoice2 UNet; only its solver is reused.
        nn.Module.__init__(self)
        self.inference_cfg_rate = cfg.inference_cfg_rate
        self.t_scheduler = cfg.t_scheduler
        self.n_mels = cfg.output_size
        self.estimator = DiT(cfg.estimator)
        g = torch.Generator().manual_seed(_NOISE_SEED)
        self.register_buffer(
            "rand_noise",
            torch.randn(1, _N_MELS, _NOISE_FRAMES, generator=g),
            persistent=False,
        )


# -------------------------------------------------------------------- flow --
class CausalMaskedDiffWithDiT(TokenMelFlow):
    """CosyVoice3 flow: speech tokens (+ prompt) -> mel of the new tokens;
    a look-ahead conv and repetition to the mel rate instead of an encoder,
    the DiT CFM estimator (which looks only left (position conv) or at
    unpadded frames (attention), so padded batches equal single runs)."""

    def __init__(self, config: CosyVoice3FlowConfig | None = None):
        super().__init__()
        cfg = config or CosyVoice3FlowConfig()
        self._init_common(cfg)
        self.pre_lookahead_layer = LookaheadLayer(
            cfg.input_size, cfg.pre_lookahead_channels, cfg.pre_lookahead_len
        )
        self.decoder = DiTConditionalCFM(cfg)

    def _encode(self, x: torch.Tensor, finalize: bool, streaming: bool) -> torch.Tensor:
        if finalize:
            h = self.pre_lookahead_layer(x)
        else:
            n = self.pre_lookahead_len
            h = self.pre_lookahead_layer(x[:, :-n], context=x[:, -n:])
        return h.repeat_interleave(self.token_mel_ratio, dim=1)

    def _encode_batch(self, fb: FlowBatch, streaming: bool) -> torch.Tensor:
        h = self.pre_lookahead_layer(fb.x)
        return h.repeat_interleave(self.token_mel_ratio, dim=1)


def load_flow3(
    state_dict: Mapping[str, torch.Tensor],
    config: CosyVoice3FlowConfig | None = None,
) -> CausalMaskedDiffWithDiT:
    """Build the CosyVoice3 flow from an original ``flow.pt`` state dict."""
    model = CausalMaskedDiffWithDiT(config)
    load_strict(model, state_dict, "flow.pt")
    return model.eval()


__all__: Sequence[str] = [
    "CosyVoice3FlowConfig",
    "DiTConfig",
    "CausalMaskedDiffWithDiT",
    "load_flow3",
    "release_rng_after_flow",
]
