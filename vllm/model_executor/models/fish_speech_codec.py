# SPDX-License-Identifier: Apache-2.0
"""Fish Speech audio codecs in plain PyTorch.

``FishDAC``: the "modded DAC" codec of OpenAudio S1 / S2 (``codec.pth``):
44.1 kHz audio, 2048 samples per code frame (21.53 Hz), 10 codebooks (one
semantic book of 4096 entries, nine residual books of 1024 entries).

The module tree mirrors the parameter names of the released ``codec.pth`` so
that the file loads without renaming:

* convolutions of the encoder / decoder keep the weight-norm parametrization
  as stored (``conv.parametrizations.weight.original0`` = g,
  ``original1`` = v);
* the vector quantizers keep the legacy weight-norm names
  (``in_proj.weight_g`` / ``weight_v``);
* the quantizer's resampling convolutions and ConvNeXt blocks are plain.

The persistent ``causal_mask`` / ``freqs_cis`` buffers of S1 files are not
model state here (masks and rotary tables are built on the fly) and are
skipped by the loader.

``FireflyGANVQ``: the fish-speech 1.5 codec
(``firefly-gan-vq-fsq-8x1024-21hz-generator.pth``): log-mel ConvNeXt encoder,
8 grouped FSQ books of 1000 codes (levels 8x5x5x5), causal HiFi-GAN head;
the same 2048-sample frame.

Both are causal, so the decoders also run incrementally
(:class:`CodecStreamingDecoder`): every causal convolution keeps the last
``(kernel - 1) * dilation`` input samples, each transposed convolution the
input frames that overlap the next chunk, and each window-limited
transformer layer the keys / values of the last ``window - 1`` positions.
Chunked output therefore equals the one-shot decode (up to float summation
order).

On CUDA, cuDNN convolutions default to TF32; parity checks against fp32
references there need ``torch.backends.cudnn.allow_tf32 = False``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vllm.logger import init_logger

logger = init_logger(__name__)

# Stream state: maps a module to whatever it needs to carry between chunks.
StreamState = dict[nn.Module, Any]

# Buffers that S1's codec.pth stores but that carry no learned state.
_SKIPPED_BUFFER_SUFFIXES = (".causal_mask", ".freqs_cis")


# --------------------------------------------------------------------------
# Parameter holders named like the release file
# --------------------------------------------------------------------------


class _WeightNormWeight(nn.Module):
    """``parametrizations.weight`` of torch's new-style weight norm."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        g_shape = (shape[0],) + (1,) * (len(shape) - 1)
        self.original0 = nn.Parameter(torch.ones(g_shape))  # g
        self.original1 = nn.Parameter(torch.empty(shape))  # v
        nn.init.normal_(self.original1, std=0.02)

    def forward(self) -> torch.Tensor:
        return torch._weight_norm(self.original1, self.original0, 0)


class _WeightNormParametrizations(nn.Module):
    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.weight = _WeightNormWeight(shape)


class _ConvParams(nn.Module):
    """Weight + bias of one convolution.

    ``norm``: ``None`` (plain ``weight``), ``"param"`` (new-style weight norm,
    ``parametrizations.weight.original0/1``) or ``"legacy"`` (old-style
    ``weight_g`` / ``weight_v``).
    """

    def __init__(self, shape: Sequence[int], bias_size: int, norm: str | None) -> None:
        super().__init__()
        self.norm = norm
        if norm is None:
            self.weight = nn.Parameter(torch.empty(shape))
            nn.init.normal_(self.weight, std=0.02)
        elif norm == "param":
            self.parametrizations = _WeightNormParametrizations(shape)
        elif norm == "legacy":
            g_shape = (shape[0],) + (1,) * (len(shape) - 1)
            self.weight_g = nn.Parameter(torch.ones(g_shape))
            self.weight_v = nn.Parameter(torch.empty(shape))
            nn.init.normal_(self.weight_v, std=0.02)
        else:
            raise ValueError(f"unknown weight norm kind {norm!r}")
        self.bias = nn.Parameter(torch.zeros(bias_size))

    def get_weight(self) -> torch.Tensor:
        if self.norm is None:
            return self.weight
        if self.norm == "param":
            return self.parametrizations.weight()
        return torch._weight_norm(self.weight_v, self.weight_g, 0)


# --------------------------------------------------------------------------
# Causal convolutions
# --------------------------------------------------------------------------


class CausalConv1d(nn.Module):
    """Conv1d padded on the left by ``(k - 1) * d + 1 - stride`` and on the
    right up to a whole number of output frames (as the original
    ``CausalConvNet``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        norm: str | None = "param",
    ) -> None:
        super().__init__()
        self.conv = _ConvParams(
            (out_channels, in_channels // groups, kernel_size), out_channels, norm
        )
        self.stride = stride
        self.dilation = dilation
        self.groups = groups
        self.effective_kernel = (kernel_size - 1) * dilation + 1
        self.left_pad = self.effective_kernel - stride

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(
            x,
            self.conv.get_weight(),
            self.conv.bias,
            stride=self.stride,
            dilation=self.dilation,
            groups=self.groups,
        )

    def forward(
        self, x: torch.Tensor, state: StreamState | None = None
    ) -> torch.Tensor:
        if state is not None:
            return self._forward_stream(x, state)
        length = x.shape[-1]
        k, s, p = self.effective_kernel, self.stride, self.left_pad
        # Number of output frames, rounded up; pad the right so that the
        # last (partial) frame is computed.
        n_out = -(-(length - k + p) // s) + 1
        right_pad = (n_out - 1) * s + k - p - length
        x = F.pad(x, (p, right_pad))
        return self._conv(x)

    def _forward_stream(self, x: torch.Tensor, state: StreamState) -> torch.Tensor:
        if self.stride != 1:
            raise NotImplementedError(
                "streaming is only defined for stride-1 causal convolutions"
            )
        p = self.left_pad
        if p == 0:
            return self._conv(x)
        past = state.get(self)
        if past is None:
            past = x.new_zeros(x.shape[0], x.shape[1], p)
        x = torch.cat([past, x], dim=-1)
        state[self] = x[..., -p:]
        return self._conv(x)


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d trimmed by ``kernel - stride`` samples on the right
    (the original ``CausalTransConvNet``): output frame block ``i`` depends
    on input frames ``i - ceil(k / s) + 1 .. i`` only."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        norm: str | None = "param",
    ) -> None:
        super().__init__()
        self.conv = _ConvParams(
            (in_channels, out_channels, kernel_size), out_channels, norm
        )
        self.kernel_size = kernel_size
        self.stride = stride
        # input frames of left context that overlap the current output
        self.context = -(-kernel_size // stride) - 1

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(
            x, self.conv.get_weight(), self.conv.bias, stride=self.stride
        )

    def forward(
        self, x: torch.Tensor, state: StreamState | None = None
    ) -> torch.Tensor:
        n = x.shape[-1]
        s = self.stride
        if state is None or self.context == 0:
            y = self._conv(x)
            return y[..., : n * s]
        c = self.context
        past = state.get(self)
        if past is None:
            # Zero input frames add nothing (the bias is added per output
            # sample, not per input frame), so they stand for "no input".
            past = x.new_zeros(x.shape[0], x.shape[1], c)
        xc = torch.cat([past, x], dim=-1)
        state[self] = xc[..., -c:]
        y = self._conv(xc)
        return y[..., c * s : c * s + n * s]


class Snake1d(nn.Module):
    """``x + sin(alpha * x)^2 / (alpha + 1e-9)``, one alpha per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(
        self, x: torch.Tensor, state: StreamState | None = None
    ) -> torch.Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class _Tanh(nn.Module):
    def forward(
        self, x: torch.Tensor, state: StreamState | None = None
    ) -> torch.Tensor:
        return torch.tanh(x)


class _Identity(nn.Module):
    def forward(
        self, x: torch.Tensor, state: StreamState | None = None
    ) -> torch.Tensor:
        return x


class _Chain(nn.ModuleList):
    """nn.Sequential whose members take the stream state."""

    def forward(
        self, x: torch.Tensor, state: StreamState | None = None
    ) -> torch.Tensor:
        for module in self:
            x = module(x, state)
        return x


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.block = _Chain(
            [
                Snake1d(dim),
                CausalConv1d(dim, dim, 7, dilation=dilation),
                Snake1d(dim),
                CausalConv1d(dim, dim, 1),
            ]
        )

    def forward(
        self, x: torch.Tensor, state: StreamState | None = None
    ) -> torch.Tensor:
        return x + self.block(x, state)


class ConvNeXtBlock(nn.Module):
    """Causal depthwise conv (k7) -> LayerNorm -> MLP(4x, GELU) -> gamma,
    with a residual connection (channels-first in and out)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, kernel_size: int = 7) -> None:
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.dwconv = CausalConv1d(dim, dim, kernel_size, groups=dim, norm=None)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.pwconv2 = nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(
        self, x: torch.Tensor, state: StreamState | None = None
    ) -> torch.Tensor:
        h = self.dwconv(x, state).transpose(1, 2)
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)


# --------------------------------------------------------------------------
# Window-limited causal transformer
# --------------------------------------------------------------------------


@dataclass
class FishDACTransformerConfig:
    n_layer: int = 8
    n_head: int = 16
    dim: int = 1024
    intermediate_size: int = 3072
    head_dim: int = 64
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    window_size: int | None = 128


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class _LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def _rope_tables(
    positions: torch.Tensor, head_dim: int, base: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin [T, head_dim // 2] for absolute positions.

    The original keeps its table in bfloat16, so the values are rounded
    through bfloat16 here too (then used in float32)."""
    half = head_dim // 2
    inv_freq = 1.0 / (
        base
        ** (
            torch.arange(0, head_dim, 2, device=positions.device)[:half].float()
            / head_dim
        )
    )
    angles = torch.outer(positions.float(), inv_freq)
    rot = torch.polar(torch.ones_like(angles), angles)
    cos = rot.real.to(torch.bfloat16).float()
    sin = rot.imag.to(torch.bfloat16).float()
    return cos, sin


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved (GPT-J style) rotary embedding; x [B, T, H, D]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1)
    return out.flatten(3).type_as(x)


class _Attention(nn.Module):
    def __init__(self, cfg: FishDACTransformerConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        inner = cfg.n_head * cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * inner, bias=False)
        self.wo = nn.Linear(inner, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.n_head, self.head_dim).unbind(2)
        q = _apply_rope(q, cos, sin).transpose(1, 2)
        k = _apply_rope(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)
        return self.wo(y), (k, v)


class _FeedForward(nn.Module):
    def __init__(self, cfg: FishDACTransformerConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _TransformerBlock(nn.Module):
    def __init__(self, cfg: FishDACTransformerConfig) -> None:
        super().__init__()
        self.attention = _Attention(cfg)
        self.feed_forward = _FeedForward(cfg)
        self.attention_norm = _RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = _RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_layer_scale = _LayerScale(cfg.dim)
        self.ffn_layer_scale = _LayerScale(cfg.dim)

    def forward(self, x, cos, sin, mask, past):
        a, kv = self.attention(self.attention_norm(x), cos, sin, mask, past)
        h = x + self.attention_layer_scale(a)
        out = h + self.ffn_layer_scale(self.feed_forward(self.ffn_norm(h)))
        return out, kv


class WindowLimitedTransformer(nn.Module):
    """Causal transformer over [B, C, T] whose attention sees the last
    ``window_size`` positions (itself included)."""

    def __init__(self, cfg: FishDACTransformerConfig, input_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(_TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = _RMSNorm(cfg.dim, cfg.norm_eps)
        if input_dim != cfg.dim:
            self.input_proj = nn.Linear(input_dim, cfg.dim)
            self.output_proj = nn.Linear(cfg.dim, input_dim)
        else:
            self.input_proj = None
            self.output_proj = None

    def forward(
        self, x: torch.Tensor, state: StreamState | None = None
    ) -> torch.Tensor:
        x = x.transpose(1, 2)
        if self.input_proj is not None:
            x = self.input_proj(x)
        t = x.shape[1]
        start, past = 0, [None] * len(self.layers)
        if state is not None and self in state:
            start, past = state[self]
        past_len = 0 if past[0] is None else past[0][0].shape[2]
        q_pos = torch.arange(start, start + t, device=x.device)
        k_pos = torch.arange(start - past_len, start + t, device=x.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        window = self.cfg.window_size
        if window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - window
        mask = mask[None, None]
        cos, sin = _rope_tables(q_pos, self.cfg.head_dim, self.cfg.rope_base)
        new_past = []
        for layer, kv in zip(self.layers, past):
            x, kv = layer(x, cos, sin, mask, kv)
            if state is not None:
                if window is not None:
                    kv = (
                        (kv[0][:, :, -(window - 1) :], kv[1][:, :, -(window - 1) :])
                        if window > 1
                        else (kv[0][:, :, :0], kv[1][:, :, :0])
                    )
                new_past.append(kv)
        if state is not None:
            state[self] = (start + t, new_past)
        x = self.norm(x)
        if self.output_proj is not None:
            x = self.output_proj(x)
        return x.transpose(1, 2)


# --------------------------------------------------------------------------
# Encoder / decoder
# --------------------------------------------------------------------------


class EncoderBlock(nn.Module):
    def __init__(
        self, dim: int, stride: int, transformer: FishDACTransformerConfig | None
    ) -> None:
        super().__init__()
        half = dim // 2
        self.block = _Chain(
            [
                ResidualUnit(half, 1),
                ResidualUnit(half, 3),
                ResidualUnit(half, 9),
                Snake1d(half),
                CausalConv1d(half, dim, 2 * stride, stride=stride),
                (
                    WindowLimitedTransformer(transformer, dim)
                    if transformer is not None
                    else _Identity()
                ),
            ]
        )

    def forward(self, x, state=None):
        return self.block(x, state)


class Encoder(nn.Module):
    def __init__(self, cfg: FishDACConfig) -> None:
        super().__init__()
        d = cfg.encoder_dim
        blocks: list[nn.Module] = [CausalConv1d(1, d, 7)]
        for stride, n_t in zip(cfg.encoder_rates, cfg.encoder_transformer_layers):
            d *= 2
            tcfg = None
            if n_t > 0:
                tcfg = FishDACTransformerConfig(
                    n_layer=n_t,
                    n_head=d // cfg.encoder_head_dim,
                    dim=d,
                    intermediate_size=3 * d,
                    head_dim=cfg.encoder_head_dim,
                    rope_base=cfg.rope_base,
                    norm_eps=cfg.norm_eps,
                    window_size=cfg.encoder_window_size,
                )
            blocks.append(EncoderBlock(d, stride, tcfg))
        blocks += [Snake1d(d), CausalConv1d(d, cfg.latent_dim, 3)]
        self.block = _Chain(blocks)

    def forward(self, x, state=None):
        return self.block(x, state)


class DecoderBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.block = _Chain(
            [
                Snake1d(in_dim),
                CausalConvTranspose1d(in_dim, out_dim, 2 * stride, stride),
                ResidualUnit(out_dim, 1),
                ResidualUnit(out_dim, 3),
                ResidualUnit(out_dim, 9),
            ]
        )

    def forward(self, x, state=None):
        return self.block(x, state)


class Decoder(nn.Module):
    def __init__(self, cfg: FishDACConfig) -> None:
        super().__init__()
        ch = cfg.decoder_dim
        layers: list[nn.Module] = [CausalConv1d(cfg.latent_dim, ch, 7)]
        out_dim = ch
        for i, stride in enumerate(cfg.decoder_rates):
            in_dim, out_dim = ch // 2**i, ch // 2 ** (i + 1)
            layers.append(DecoderBlock(in_dim, out_dim, stride))
        layers += [Snake1d(out_dim), CausalConv1d(out_dim, 1, 7), _Tanh()]
        self.model = _Chain(layers)

    def forward(self, x, state=None):
        return self.model(x, state)


# --------------------------------------------------------------------------
# Quantizer
# --------------------------------------------------------------------------


class VectorQuantize(nn.Module):
    """DAC factorized VQ: 1x1 in/out projections (legacy weight norm) and a
    codebook searched by cosine similarity."""

    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.in_proj = _ConvParams((codebook_dim, input_dim, 1), codebook_dim, "legacy")
        self.out_proj = _ConvParams((input_dim, codebook_dim, 1), input_dim, "legacy")
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def _out(self, z_p: torch.Tensor) -> torch.Tensor:
        return F.conv1d(z_p, self.out_proj.get_weight(), self.out_proj.bias)

    def decode_code(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T] -> [B, input_dim, T]"""
        return self._out(self.codebook(codes).transpose(1, 2))

    def encode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [B, D, T] -> (quantized z [B, D, T], codes [B, T])"""
        z_e = F.conv1d(z, self.in_proj.get_weight(), self.in_proj.bias)
        b, d, t = z_e.shape
        enc = F.normalize(z_e.transpose(1, 2).reshape(b * t, d))
        book = F.normalize(self.codebook.weight)
        # squared euclidean distance of unit vectors, in the same form as
        # the original so that the argmin matches it bit for bit
        dist = (
            enc.pow(2).sum(1, keepdim=True)
            - 2 * enc @ book.t()
            + book.pow(2).sum(1, keepdim=True).t()
        )
        codes = (-dist).max(1)[1].view(b, t)
        z_q = self.codebook(codes).transpose(1, 2)
        # the original's straight-through form; kept for bit-exact residuals
        z_q = z_e + (z_q - z_e)
        return self._out(z_q), codes


class ResidualVectorQuantize(nn.Module):
    def __init__(
        self, input_dim: int, n_codebooks: int, codebook_size: int, codebook_dim: int
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.quantizers = nn.ModuleList(
            VectorQuantize(input_dim, codebook_size, codebook_dim)
            for _ in range(n_codebooks)
        )

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        z = None
        for i, q in enumerate(self.quantizers):
            zi = q.decode_code(codes[:, i])
            z = zi if z is None else z + zi
        return z

    def encode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual = z
        z_q = None
        codes = []
        for q in self.quantizers:
            zi, ci = q.encode(residual)
            z_q = zi if z_q is None else z_q + zi
            residual = residual - zi
            codes.append(ci)
        return z_q, torch.stack(codes, dim=1)


class DownsampleResidualVectorQuantize(nn.Module):
    """Semantic book + residual books at 1/4 of the latent frame rate, with
    transformers before (encode) and after (decode) quantization."""

    def __init__(self, cfg: FishDACConfig) -> None:
        super().__init__()
        dim = cfg.latent_dim
        self.semantic_quantizer = ResidualVectorQuantize(
            dim, 1, cfg.semantic_codebook_size, cfg.codebook_dim
        )
        self.quantizer = ResidualVectorQuantize(
            dim, cfg.n_codebooks, cfg.codebook_size, cfg.codebook_dim
        )
        self.downsample = _Chain(
            _Chain([CausalConv1d(dim, dim, f, stride=f, norm=None), ConvNeXtBlock(dim)])
            for f in cfg.downsample_factor
        )
        self.upsample = _Chain(
            _Chain(
                [CausalConvTranspose1d(dim, dim, f, f, norm=None), ConvNeXtBlock(dim)]
            )
            for f in reversed(cfg.downsample_factor)
        )
        self.pre_module = WindowLimitedTransformer(cfg.quantizer_transformer, dim)
        self.post_module = WindowLimitedTransformer(cfg.quantizer_transformer, dim)

    def decode(
        self, codes: torch.Tensor, state: StreamState | None = None
    ) -> torch.Tensor:
        z = self.semantic_quantizer.from_codes(
            codes[:, :1]
        ) + self.quantizer.from_codes(codes[:, 1:])
        z = self.post_module(z, state)
        return self.upsample(z, state)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        z = self.downsample(z)
        z = self.pre_module(z)
        semantic_z, semantic_codes = self.semantic_quantizer.encode(z)
        _, codes = self.quantizer.encode(z - semantic_z)
        return torch.cat([semantic_codes, codes], dim=1)


# --------------------------------------------------------------------------
# The codec
# --------------------------------------------------------------------------


@dataclass
class FishDACConfig:
    """Sizes of the modded DAC. Defaults are the released S1 / S2 codec
    (``fish_speech/configs/modded_dac_vq.yaml``)."""

    sample_rate: int = 44100
    encoder_dim: int = 64
    encoder_rates: tuple[int, ...] = (2, 4, 8, 8)
    latent_dim: int = 1024
    decoder_dim: int = 1536
    decoder_rates: tuple[int, ...] = (8, 8, 4, 2)
    encoder_transformer_layers: tuple[int, ...] = (0, 0, 0, 4)
    encoder_head_dim: int = 64
    encoder_window_size: int | None = 512
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    n_codebooks: int = 9
    codebook_size: int = 1024
    semantic_codebook_size: int = 4096
    codebook_dim: int = 8
    downsample_factor: tuple[int, ...] = (2, 2)
    quantizer_transformer: FishDACTransformerConfig = field(
        default_factory=FishDACTransformerConfig
    )

    @property
    def hop_length(self) -> int:
        return math.prod(self.encoder_rates)

    @property
    def frame_length(self) -> int:
        return self.hop_length * math.prod(self.downsample_factor)

    @classmethod
    def from_state_dict(
        cls, sd: Mapping[str, torch.Tensor], **overrides: Any
    ) -> FishDACConfig:
        """Read the sizes a ``codec.pth`` implies. Head sizes, window sizes
        and rope base are not stored; they keep the release defaults unless
        given in ``overrides`` (``quantizer_head_dim``,
        ``quantizer_window_size`` go into ``quantizer_transformer``)."""
        sd = _strip_state_dict(sd)

        def shape(key: str) -> tuple[int, ...]:
            if key not in sd:
                raise KeyError(
                    f"codec state dict lacks {key!r}: not a Fish modded-DAC codec.pth"
                )
            return tuple(sd[key].shape)

        wn = "conv.parametrizations.weight.original1"
        kw: dict[str, Any] = {}
        kw["decoder_dim"], kw["latent_dim"], _ = shape(f"decoder.model.0.{wn}")
        rates = []
        i = 1
        while f"decoder.model.{i}.block.1.{wn}" in sd:
            rates.append(shape(f"decoder.model.{i}.block.1.{wn}")[2] // 2)
            i += 1
        kw["decoder_rates"] = tuple(rates)

        has_encoder = f"encoder.block.0.{wn}" in sd
        if has_encoder:
            kw["encoder_dim"] = shape(f"encoder.block.0.{wn}")[0]
            enc_rates, enc_layers = [], []
            i = 1
            while f"encoder.block.{i}.block.4.{wn}" in sd:
                enc_rates.append(shape(f"encoder.block.{i}.block.4.{wn}")[2] // 2)
                prefix = f"encoder.block.{i}.block.5.layers."
                n = len(
                    {k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)}
                )
                enc_layers.append(n)
                i += 1
            kw["encoder_rates"] = tuple(enc_rates)
            kw["encoder_transformer_layers"] = tuple(enc_layers)

        q = "quantizer."
        kw["semantic_codebook_size"], kw["codebook_dim"] = shape(
            q + "semantic_quantizer.quantizers.0.codebook.weight"
        )
        kw["codebook_size"], _ = shape(q + "quantizer.quantizers.0.codebook.weight")
        n = 0
        while f"{q}quantizer.quantizers.{n}.codebook.weight" in sd:
            n += 1
        kw["n_codebooks"] = n
        factors = []
        i = 0
        while f"{q}upsample.{i}.0.conv.weight" in sd:
            factors.append(shape(f"{q}upsample.{i}.0.conv.weight")[2])
            i += 1
        kw["downsample_factor"] = tuple(reversed(factors))

        head_dim = overrides.pop("quantizer_head_dim", 64)
        window = overrides.pop("quantizer_window_size", 128)
        prefix = q + "post_module.layers."
        n_layer = len(
            {k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)}
        )
        qkv_out, dim = shape(prefix + "0.attention.wqkv.weight")
        inter, _ = shape(prefix + "0.feed_forward.w1.weight")
        kw["quantizer_transformer"] = FishDACTransformerConfig(
            n_layer=n_layer,
            n_head=qkv_out // 3 // head_dim,
            dim=dim,
            intermediate_size=inter,
            head_dim=head_dim,
            rope_base=overrides.get("rope_base", 10000.0),
            norm_eps=overrides.get("norm_eps", 1e-5),
            window_size=window,
        )
        kw.update(overrides)
        return cls(**kw)


def _strip_state_dict(sd: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if any(k.startswith("generator.") for k in sd):
        sd = {
            k[len("generator.") :]: v
            for k, v in sd.items()
            if k.startswith("generator.")
        }
    return sd


class FishDAC(nn.Module):
    """The OpenAudio S1 / S2 codec.

    ``decode(codes[B, 10, T]) -> audio[B, 1, T * 2048]`` and
    ``encode(audio[B, 1, L]) -> codes[B, 10, ceil(L / 2048)]`` at 44.1 kHz.
    """

    def __init__(
        self, config: FishDACConfig | None = None, with_encoder: bool = True
    ) -> None:
        super().__init__()
        self.config = config = config or FishDACConfig()
        self.sample_rate = config.sample_rate
        self.hop_length = config.hop_length
        self.frame_length = config.frame_length
        self.frame_rate = config.sample_rate / config.frame_length
        self.num_codebooks = 1 + config.n_codebooks
        self.encoder = Encoder(config) if with_encoder else None
        self.quantizer = DownsampleResidualVectorQuantize(config)
        self.decoder = Decoder(config)
        if config.frame_length != math.prod(config.decoder_rates) * math.prod(
            config.downsample_factor
        ):
            raise ValueError(
                "encoder and decoder rates disagree: "
                f"{config.encoder_rates} vs "
                f"{config.decoder_rates}"
            )

    def check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Validate codes [B, K, T] (or [K, T]) and return them as [B, K, T].

        The original clamps out-of-range ids silently; a wrong id here is a
        bug upstream, so it is an error."""
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"codes must be a tensor, got {type(codes)}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise TypeError(f"codes must be integers, got {codes.dtype}")
        if codes.ndim == 2:
            codes = codes[None]
        if codes.ndim != 3 or codes.shape[1] != self.num_codebooks:
            raise ValueError(
                f"codes must be [B, {self.num_codebooks}, T], got {tuple(codes.shape)}"
            )
        if codes.shape[2] == 0:
            raise ValueError("codes have no frames")
        cfg = self.config
        for rows, size, what in (
            (codes[:, :1], cfg.semantic_codebook_size, "semantic"),
            (codes[:, 1:], cfg.codebook_size, "residual"),
        ):
            lo, hi = int(rows.min()), int(rows.max())
            if lo < 0 or hi >= size:
                raise ValueError(
                    f"{what} codes must lie in [0, {size}), got values in [{lo}, {hi}]"
                )
        return codes.long()

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, 10, T] -> audio [B, 1, T * frame_length]"""
        codes = self.check_codes(codes).to(self._device())
        return self.decoder(self.quantizer.decode(codes))

    @torch.inference_mode()
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, 1, L] or [B, L] at ``sample_rate`` -> codes
        [B, 10, ceil(L / frame_length)] (audio is right-padded with zeros
        to whole frames, as the original does)."""
        if self.encoder is None:
            raise RuntimeError("this FishDAC was built without its encoder")
        if audio.ndim == 2:
            audio = audio[:, None]
        if audio.ndim != 3 or audio.shape[1] != 1:
            raise ValueError(
                f"audio must be [B, 1, L] or [B, L], got {tuple(audio.shape)}"
            )
        if audio.shape[-1] == 0:
            raise ValueError("audio is empty")
        pad = -audio.shape[-1] % self.frame_length
        audio = F.pad(audio.to(self._device(), self._dtype()), (0, pad))
        return self.quantizer.encode(self.encoder(audio))

    def streaming_decoder(self) -> CodecStreamingDecoder:
        return CodecStreamingDecoder(self)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        config: FishDACConfig | None = None,
        with_encoder: bool = True,
        device: torch.device | str = "cpu",
        **config_overrides: Any,
    ) -> FishDAC:
        """Load a released ``codec.pth`` (or a directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "codec.pth")
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        sd = _strip_state_dict(sd)
        if config is None:
            config = FishDACConfig.from_state_dict(sd, **config_overrides)
        model = cls(config, with_encoder=with_encoder)
        model.load_codec_state_dict(sd)
        return model.to(device).eval()

    def load_codec_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Load release-format weights strictly: skip the S1 mask / rope
        buffers (and the encoder when built without it); any missing,
        unexpected or mis-shaped tensor is an error."""
        _load_strict(
            self,
            _strip_state_dict(sd),
            skip_prefixes=() if self.encoder is not None else ("encoder.",),
        )

    def _device(self) -> torch.device:
        return self.decoder.model[0].conv.bias.device

    def _dtype(self) -> torch.dtype:
        return self.decoder.model[0].conv.bias.dtype


# --------------------------------------------------------------------------
# Firefly-GAN-VQ (fish-speech 1.5)
# --------------------------------------------------------------------------


@dataclass
class FireflyConfig:
    """Sizes of firefly-gan-vq. Defaults are the released
    ``firefly-gan-vq-fsq-8x1024-21hz-generator.pth``
    (``fish_speech/configs/firefly_gan_vq.yaml`` at v1.5.1)."""

    sample_rate: int = 44100
    n_mels: int = 160
    n_fft: int = 2048
    win_length: int = 2048
    hop_length: int = 512
    backbone_depths: tuple[int, ...] = (3, 3, 9, 3)
    backbone_dims: tuple[int, ...] = (128, 256, 384, 512)
    backbone_kernel_size: int = 7
    fsq_groups: int = 8
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    fsq_num_quantizers: int = 1
    downsample_factor: tuple[int, ...] = (2, 2)
    upsample_initial_channel: int = 512
    upsample_rates: tuple[int, ...] = (8, 8, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 4, 4, 4)
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5),) * 3
    pre_conv_kernel_size: int = 13
    post_conv_kernel_size: int = 13

    @property
    def latent_dim(self) -> int:
        return self.backbone_dims[-1]

    @property
    def frame_length(self) -> int:
        return self.hop_length * math.prod(self.downsample_factor)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.fsq_levels)

    @classmethod
    def from_state_dict(
        cls, sd: Mapping[str, torch.Tensor], **overrides: Any
    ) -> FireflyConfig:
        """Read the sizes a generator ``.pth`` implies. Not stored, so kept
        at the release values unless overridden: FSQ levels (only their
        count is checked), resblock dilations, STFT sizes; upsample strides
        are taken as kernel // 2 (true of the release)."""
        sd = _strip_state_dict(sd)

        def shape(key: str) -> tuple[int, ...]:
            if key not in sd:
                raise KeyError(
                    f"generator state dict lacks {key!r}: not a "
                    "Fish firefly-gan-vq checkpoint"
                )
            return tuple(sd[key].shape)

        def count(prefix: str) -> int:
            return len(
                {k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)}
            )

        wn = "conv.parametrizations.weight.original1"
        kw: dict[str, Any] = {}
        n_ups = count("head.ups.")
        kernels = tuple(shape(f"head.ups.{i}.{wn}")[2] for i in range(n_ups))
        kw["upsample_kernel_sizes"] = kernels
        kw["upsample_rates"] = tuple(k // 2 for k in kernels)
        c0, mels_in, kw["pre_conv_kernel_size"] = shape(f"head.conv_pre.{wn}")
        kw["upsample_initial_channel"] = c0
        kw["post_conv_kernel_size"] = shape(f"head.conv_post.{wn}")[2]
        n_res = count("head.resblocks.0.blocks.")
        kw["resblock_kernel_sizes"] = tuple(
            shape(f"head.resblocks.0.blocks.{j}.convs1.0.{wn}")[2] for j in range(n_res)
        )
        kw["resblock_dilation_sizes"] = overrides.pop(
            "resblock_dilation_sizes", ((1, 3, 5),) * n_res
        )
        groups = count("quantizer.residual_fsq.rvqs.")
        kw["fsq_groups"] = groups
        code_dim, group_dim = shape("quantizer.residual_fsq.rvqs.0.project_in.weight")
        factors = [
            shape(f"quantizer.downsample.{i}.0.conv.weight")[2]
            for i in range(count("quantizer.downsample."))
        ]
        kw["downsample_factor"] = tuple(factors)
        if "backbone.norm.weight" in sd:
            n_stages = count("backbone.stages.")
            kw["backbone_depths"] = tuple(
                count(f"backbone.stages.{i}.") for i in range(n_stages)
            )
            kw["backbone_dims"] = tuple(
                shape(f"backbone.stages.{i}.0.gamma")[0] for i in range(n_stages)
            )
            kw["n_mels"] = shape("backbone.downsample_layers.0.0.conv.weight")[1]
            kw["backbone_kernel_size"] = shape(
                "backbone.stages.0.0.dwconv.conv.weight"
            )[2]
        else:
            # decoder-only file: the latent size comes from the head
            kw["backbone_dims"] = (mels_in,)
            kw["backbone_depths"] = (0,)
        kw.update(overrides)
        cfg = cls(**kw)
        if cfg.latent_dim != groups * group_dim or mels_in != cfg.latent_dim:
            raise ValueError(
                "inconsistent firefly sizes: latent "
                f"{cfg.latent_dim}, {groups} FSQ groups of "
                f"{group_dim}, head input {mels_in}"
            )
        if len(cfg.fsq_levels) != code_dim:
            raise ValueError(
                f"FSQ code dim {code_dim} does not match levels {cfg.fsq_levels}"
            )
        return cfg


class _ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over dim 1 of [B, C, T] (the original's formula)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, state=None) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        var = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(var + self.eps)
        return self.weight[:, None] * x + self.bias[:, None]


class _PointwiseConv(nn.Module):
    """nn.Conv1d(k=1) with state-dict names ``weight`` / ``bias``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim, 1))
        nn.init.normal_(self.weight, std=0.02)
        self.bias = nn.Parameter(torch.zeros(out_dim))

    def forward(self, x: torch.Tensor, state=None) -> torch.Tensor:
        return F.conv1d(x, self.weight, self.bias)


class FireflyLogMel(nn.Module):
    """Log-mel front end: reflect pad (win - hop) / 2, |STFT| (no
    centering, periodic Hann), Slaney mel filters, log(clamp 1e-5)."""

    def __init__(self, cfg: FireflyConfig) -> None:
        super().__init__()
        import torchaudio.functional as AF

        self.cfg = cfg
        self.register_buffer(
            "window", torch.hann_window(cfg.win_length), persistent=False
        )
        fb = AF.melscale_fbanks(
            n_freqs=cfg.n_fft // 2 + 1,
            f_min=0.0,
            f_max=float(cfg.sample_rate // 2),
            n_mels=cfg.n_mels,
            sample_rate=cfg.sample_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        self.register_buffer("fb", fb, persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, L] -> log mel [B, n_mels, frames]"""
        cfg = self.cfg
        extra = cfg.win_length - cfg.hop_length
        y = F.pad(audio[:, None], (extra // 2, (extra + 1) // 2), mode="reflect")[:, 0]
        spec = torch.stft(
            y,
            cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.win_length,
            window=self.window.float(),
            center=False,
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        spec = torch.view_as_real(spec)
        mag = torch.sqrt(spec.pow(2).sum(-1) + 1e-6)
        mel = torch.matmul(mag.transpose(-1, -2), self.fb.float()).transpose(-1, -2)
        return torch.log(torch.clamp(mel, min=1e-5))


class FireflyConvNeXtBlock(ConvNeXtBlock):
    """Same weights and maths as the DAC quantizer's ConvNeXt block."""

    def __init__(self, dim: int, kernel_size: int = 7) -> None:
        super().__init__(dim, kernel_size=kernel_size)


class FireflyBackbone(nn.Module):
    """ConvNeXt encoder from log mel to the latent."""

    def __init__(self, cfg: FireflyConfig) -> None:
        super().__init__()
        dims = cfg.backbone_dims
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(
            _Chain(
                [
                    CausalConv1d(cfg.n_mels, dims[0], 7, norm=None),
                    _ChannelsFirstLayerNorm(dims[0]),
                ]
            )
        )
        for i in range(len(dims) - 1):
            self.downsample_layers.append(
                _Chain(
                    [
                        _ChannelsFirstLayerNorm(dims[i]),
                        _PointwiseConv(dims[i], dims[i + 1]),
                    ]
                )
            )
        self.stages = nn.ModuleList(
            _Chain(FireflyConvNeXtBlock(d, cfg.backbone_kernel_size) for _ in range(n))
            for d, n in zip(dims, cfg.backbone_depths)
        )
        self.norm = _ChannelsFirstLayerNorm(dims[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.norm(x)


class _ResidualFSQGroup(nn.Module):
    """One group of GroupedResidualFSQ: Linear in / out around
    ``num_quantizers`` FSQ stages with implicit codebooks."""

    def __init__(self, dim: int, levels: Sequence[int], num_quantizers: int) -> None:
        super().__init__()
        self.project_in = nn.Linear(dim, len(levels))
        self.project_out = nn.Linear(len(levels), dim)
        lv = torch.tensor(levels, dtype=torch.int64)
        self.register_buffer("levels", lv, persistent=False)
        basis = torch.cumprod(torch.tensor([1] + list(levels[:-1])), 0)
        self.register_buffer("basis", basis, persistent=False)
        scales = torch.stack([(lv.float() - 1) ** -q for q in range(num_quantizers)])
        self.register_buffer("scales", scales, persistent=False)

    def _bound(self, z: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        half_l = (self.levels - 1) * (1 + eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = (offset / half_l).atanh()
        return (z + shift).tanh() * half_l - offset

    def codes_from_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T, Q] -> summed scaled codes [B, T, len(levels)]"""
        half = self.levels // 2
        lvl = (idx[..., None] // self.basis) % self.levels
        codes = (lvl - half) / half  # [B, T, Q, D]
        return (codes * self.scales).sum(2)

    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        codes = self.codes_from_indices(idx)
        return self.project_out(codes.to(self.project_out.weight.dtype))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, dim] -> indices [B, T, Q]"""
        residual = self._bound(self.project_in(x).float())
        half = self.levels // 2
        out = []
        for q in range(self.scales.shape[0]):
            scale = self.scales[q]
            # FSQ.quantize bounds again before rounding
            code = self._bound(residual / scale).round() / half
            out.append(((code * half + half) * self.basis).sum(-1).to(torch.int32))
            residual = residual - code * scale
        return torch.stack(out, dim=-1).long()


class _GroupedResidualFSQ(nn.Module):
    def __init__(self, cfg: FireflyConfig) -> None:
        super().__init__()
        self.rvqs = nn.ModuleList(
            _ResidualFSQGroup(
                cfg.latent_dim // cfg.fsq_groups, cfg.fsq_levels, cfg.fsq_num_quantizers
            )
            for _ in range(cfg.fsq_groups)
        )


class FireflyQuantizer(nn.Module):
    def __init__(self, cfg: FireflyConfig) -> None:
        super().__init__()
        dim = cfg.latent_dim
        self.cfg = cfg
        self.residual_fsq = _GroupedResidualFSQ(cfg)
        self.downsample = _Chain(
            _Chain(
                [
                    CausalConv1d(dim, dim, f, stride=f, norm=None),
                    FireflyConvNeXtBlock(dim),
                ]
            )
            for f in cfg.downsample_factor
        )
        self.upsample = _Chain(
            _Chain(
                [
                    CausalConvTranspose1d(dim, dim, f, f, norm=None),
                    FireflyConvNeXtBlock(dim),
                ]
            )
            for f in reversed(cfg.downsample_factor)
        )

    def decode(
        self, codes: torch.Tensor, state: StreamState | None = None
    ) -> torch.Tensor:
        """codes [B, G * Q, T] -> latent [B, dim, T * prod(downsample)]"""
        g = self.cfg.fsq_groups
        b, _, t = codes.shape
        idx = codes.view(b, g, -1, t).permute(1, 0, 3, 2)  # [G, B, T, Q]
        z = torch.cat(
            [rvq.decode(i) for rvq, i in zip(self.residual_fsq.rvqs, idx)], dim=-1
        )
        return self.upsample(z.transpose(1, 2), state)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        z = self.downsample(z).transpose(1, 2)
        parts = z.chunk(self.cfg.fsq_groups, dim=-1)
        idx = [rvq.encode(p) for rvq, p in zip(self.residual_fsq.rvqs, parts)]
        # [B, T, Q] per group -> [B, G * Q, T]
        return torch.cat([i.transpose(1, 2) for i in idx], dim=1)


class _ResBlock1(nn.Module):
    def __init__(self, ch: int, kernel: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            CausalConv1d(ch, ch, kernel, dilation=d) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            CausalConv1d(ch, ch, kernel, dilation=d) for d in dilations
        )

    def forward(self, x, state=None):
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.silu(c1(F.silu(x), state)), state)
        return x


class _ParallelBlock(nn.Module):
    def __init__(self, ch: int, cfg: FireflyConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            _ResBlock1(ch, k, d)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
        )

    def forward(self, x, state=None):
        return torch.stack([b(x, state) for b in self.blocks]).mean(0)


class FireflyHead(nn.Module):
    """Causal HiFi-GAN generator."""

    def __init__(self, cfg: FireflyConfig) -> None:
        super().__init__()
        c0 = cfg.upsample_initial_channel
        self.conv_pre = CausalConv1d(cfg.latent_dim, c0, cfg.pre_conv_kernel_size)
        self.ups = nn.ModuleList(
            CausalConvTranspose1d(c0 // 2**i, c0 // 2 ** (i + 1), k, u)
            for i, (u, k) in enumerate(
                zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)
            )
        )
        self.resblocks = nn.ModuleList(
            _ParallelBlock(c0 // 2 ** (i + 1), cfg)
            for i in range(len(cfg.upsample_rates))
        )
        self.conv_post = CausalConv1d(
            c0 // 2 ** len(cfg.upsample_rates), 1, cfg.post_conv_kernel_size
        )

    def forward(self, x, state=None):
        x = self.conv_pre(x, state)
        for up, res in zip(self.ups, self.resblocks):
            x = res(up(F.silu(x), state), state)
        return torch.tanh(self.conv_post(F.silu(x), state))


class FireflyGANVQ(nn.Module):
    """fish-speech 1.5 codec: ``decode(codes[B, 8, T]) ->
    audio[B, 1, T * 2048]``, ``encode(audio) -> codes`` at 44.1 kHz."""

    def __init__(
        self, config: FireflyConfig | None = None, with_encoder: bool = True
    ) -> None:
        super().__init__()
        self.config = config = config or FireflyConfig()
        if math.prod(config.upsample_rates) != config.hop_length:
            raise ValueError(
                f"upsample rates {config.upsample_rates} do not "
                f"multiply to hop {config.hop_length}"
            )
        self.sample_rate = config.sample_rate
        self.hop_length = config.hop_length
        self.frame_length = config.frame_length
        self.frame_rate = config.sample_rate / config.frame_length
        self.num_codebooks = config.fsq_groups * config.fsq_num_quantizers
        self.codebook_size = config.codebook_size
        self.spec_transform = FireflyLogMel(config) if with_encoder else None
        self.backbone = FireflyBackbone(config) if with_encoder else None
        self.quantizer = FireflyQuantizer(config)
        self.head = FireflyHead(config)

    def check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"codes must be a tensor, got {type(codes)}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise TypeError(f"codes must be integers, got {codes.dtype}")
        if codes.ndim == 2:
            codes = codes[None]
        if codes.ndim != 3 or codes.shape[1] != self.num_codebooks:
            raise ValueError(
                f"codes must be [B, {self.num_codebooks}, T], got {tuple(codes.shape)}"
            )
        if codes.shape[2] == 0:
            raise ValueError("codes have no frames")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.codebook_size:
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), "
                f"got values in [{lo}, {hi}]"
            )
        return codes.long()

    def _device(self) -> torch.device:
        return self.head.conv_pre.conv.bias.device

    def _dtype(self) -> torch.dtype:
        return self.head.conv_pre.conv.bias.dtype

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, 8, T] -> audio [B, 1, T * frame_length]"""
        codes = self.check_codes(codes).to(self._device())
        return self.head(self.quantizer.decode(codes))

    @torch.inference_mode()
    def encode(
        self, audio: torch.Tensor, audio_lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """audio [B, 1, L] or [B, L] -> codes [B, 8, ceil((L // hop) / 4)],
        as the original ``encode(audio, audio_lengths)``: mel frames past
        ``audio_lengths // hop`` (default: L) are zeroed; the trailing code
        frames cover that padding and partial frames (the valid count is
        ``audio_lengths // frame_length``)."""
        if self.backbone is None:
            raise RuntimeError("this FireflyGANVQ was built without its encoder")
        if audio.ndim == 3:
            if audio.shape[1] != 1:
                raise ValueError("audio must be mono [B, 1, L]")
            audio = audio[:, 0]
        if audio.ndim != 2:
            raise ValueError(
                f"audio must be [B, 1, L] or [B, L], got {tuple(audio.shape)}"
            )
        if audio.shape[-1] < self.hop_length:
            raise ValueError(f"audio shorter than one hop ({self.hop_length} samples)")
        audio = audio.float().to(self._device())
        # the STFT front end runs in fp32 whatever the weights' dtype
        mels = self.spec_transform(audio).to(self._dtype())
        if audio_lengths is None:
            audio_lengths = torch.full((audio.shape[0],), audio.shape[-1])
        n_mel = torch.as_tensor(audio_lengths, device=mels.device) // self.hop_length
        mask = (
            torch.arange(mels.shape[-1], device=mels.device)[None] < n_mel[:, None]
        ).to(mels.dtype)[:, None]
        mels = mels * mask
        return self.quantizer.encode(self.backbone(mels) * mask)

    def streaming_decoder(self) -> CodecStreamingDecoder:
        return CodecStreamingDecoder(self)

    def load_codec_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Strict release-format load (see :func:`_load_strict`)."""
        _load_strict(
            self,
            _strip_state_dict(sd),
            skip_prefixes=() if self.backbone is not None else ("backbone.",),
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        config: FireflyConfig | None = None,
        with_encoder: bool = True,
        device: torch.device | str = "cpu",
        **config_overrides: Any,
    ) -> FireflyGANVQ:
        """Load ``firefly-gan-vq-fsq-8x1024-21hz-generator.pth`` (or a
        directory holding it)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "firefly-gan-vq-fsq-8x1024-21hz-generator.pth")
        sd = _strip_state_dict(
            torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        )
        if config is None:
            config = FireflyConfig.from_state_dict(sd, **config_overrides)
        model = cls(config, with_encoder=with_encoder)
        model.load_codec_state_dict(sd)
        return model.to(device).eval()


class CodecStreamingDecoder:
    """Decodes a code stream chunk by chunk; the concatenated chunks equal
    the one-shot ``decode`` of the whole stream (up to float rounding).

    Every layer of both codecs is causal. Carried state: for every causal
    conv the last ``(k - 1) * d`` inputs, for each transposed conv the input
    frames that overlap the next chunk, and for each window-limited
    transformer layer the keys / values of the last ``window - 1`` frames
    plus the absolute position (RoPE)."""

    def __init__(self, codec: FireflyGANVQ | FishDAC) -> None:
        self.codec = codec
        self.state: StreamState = {}
        self.frames = 0

    def reset(self) -> None:
        self.state = {}
        self.frames = 0

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codec = self.codec
        codes = codec.check_codes(codes).to(codec._device())
        self.frames += codes.shape[-1]
        if isinstance(codec, FishDAC):
            return codec.decoder(codec.quantizer.decode(codes, self.state), self.state)
        return codec.head(codec.quantizer.decode(codes, self.state), self.state)


def _load_strict(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    skip_prefixes: tuple[str, ...] = (),
) -> None:
    """Load release-format weights; any missing, unexpected or mis-shaped
    tensor is an error (S1's mask / rope buffers are skipped)."""
    own = model.state_dict()
    wanted: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for k, v in sd.items():
        if k.endswith(_SKIPPED_BUFFER_SUFFIXES) or k.startswith(skip_prefixes):
            continue
        if k not in own:
            unexpected.append(k)
        elif tuple(own[k].shape) != tuple(v.shape):
            mismatched.append(
                f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            )
        else:
            wanted[k] = v
    bad_names = {m.split(":")[0] for m in mismatched}
    missing = sorted(set(own) - set(wanted) - bad_names)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:5]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:5]})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[:5]})")
    if problems:
        raise ValueError(
            f"codec weights do not fit the "
            f"{type(model).__name__} built from "
            f"{model.config}: " + "; ".join(problems)
        )
    model.load_state_dict(wanted, strict=True)
    logger.debug("Loaded %s: %d tensors", type(model).__name__, len(wanted))


class FishCodecSpeechDecoder:
    """``SpeechDecoder`` of the Fish Speech models for the speech API.

    Frames are ``[T, K]`` integer arrays (codebook 0 = the semantic code,
    then the residual codes), as the model's ``get_speech_frames`` returns
    them. A batch of requests is decoded in one call, padded to the longest
    (the codecs are causal: padding at the end does not change earlier
    samples).
    """

    def __init__(self, codec: FishDAC | FireflyGANVQ) -> None:
        self.codec = codec
        self.sample_rate = codec.sample_rate
        self.samples_per_frame = codec.frame_length
        self.num_codebooks = codec.num_codebooks

    def _codes(self, frames: np.ndarray) -> torch.Tensor:
        frames = np.asarray(frames)
        if frames.ndim != 2 or frames.shape[1] != self.num_codebooks:
            raise ValueError(
                f"frames must be [T, {self.num_codebooks}], got {frames.shape}"
            )
        return torch.from_numpy(np.ascontiguousarray(frames.T)).long()

    @torch.inference_mode()
    def decode(
        self, frames: list[np.ndarray], voices: list | None = None
    ) -> list[np.ndarray]:
        """``voices`` is unused: the Fish codecs need no per-voice state."""
        codes = [self._codes(f) for f in frames]
        lengths = [c.shape[1] for c in codes]
        batch = torch.zeros(
            len(codes), self.num_codebooks, max(lengths), dtype=torch.long
        )
        for i, c in enumerate(codes):
            batch[i, :, : c.shape[1]] = c
        audio = self.codec.decode(batch)[:, 0].float().cpu().numpy()
        return [audio[i, : n * self.samples_per_frame] for i, n in enumerate(lengths)]

    def open_stream(self, voice=None) -> _FishCodecStream:
        return _FishCodecStream(self)

    @torch.inference_mode()
    def encode_reference(self, audio: np.ndarray, sample_rate: int, ref_text: str):
        from vllm.config.text_to_speech import VoicePrompt

        if sample_rate != self.sample_rate:
            raise ValueError(
                f"reference audio must be {self.sample_rate} Hz, got {sample_rate}"
            )
        wav = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None]
        codes = self.codec.encode(wav)[0].cpu().numpy().astype(np.int64)
        return VoicePrompt(ref_text=ref_text, codes=codes)  # [K, T]


class _FishCodecStream:
    def __init__(self, decoder: FishCodecSpeechDecoder) -> None:
        self.decoder = decoder
        self.stream = decoder.codec.streaming_decoder()

    def decode(self, frames: np.ndarray) -> np.ndarray:
        if len(frames) == 0:
            return np.zeros(0, np.float32)
        audio = self.stream.decode(self.decoder._codes(frames)[None])
        return audio[0, 0].float().cpu().numpy()


__all__ = [
    "FishCodecSpeechDecoder",
    "FireflyConfig",
    "CodecStreamingDecoder",
    "FireflyGANVQ",
    "FishDAC",
    "FishDACConfig",
    "FishDACTransformerConfig",
]
