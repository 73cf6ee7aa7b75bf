# SPDX-License-Identifier: Apache-2.0
"""Flow-matching decoder of CosyVoice2 (speech tokens at 25 Hz -> mel 50 Hz).

A plain-PyTorch implementation of CosyVoice2's ``CausalMaskedDiffWithXvec``:

* token embedding -> ``UpsampleConformerEncoder`` (pre-lookahead conv, 6
  relative-position conformer blocks, 2x upsampling, 4 more blocks) ->
  ``encoder_proj`` gives the per-frame condition ``mu``;
* ``CausalConditionalCFM``: Euler integration (cosine time schedule) of the
  velocity predicted by a causal 1-D UNet (``CausalConditionalDecoder``) with
  classifier-free guidance, from a fixed noise tensor (seed 0), conditioned on
  ``mu``, the projected speaker x-vector and the prompt mel.

Module and parameter names follow the original, so a released ``flow.pt``
state dict loads with ``strict=True``. Streaming follows the original
(``CosyVoice2Model.token2wav``): the whole token prefix is re-encoded with
chunk-causal attention masks and the last ``pre_lookahead_len`` tokens passed
as look-ahead context.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from vllm.logger import init_logger
from vllm.model_executor.models.cosyvoice_hift import load_strict

logger = init_logger(__name__)

# The original draws its initial noise once: seed 0, randn([1, 80, 50 * 300]).
_NOISE_SEED = 0
_NOISE_FRAMES = 50 * 300


# ------------------------------------------------------------------ config --
@dataclass
class FlowEncoderConfig:
    input_size: int = 512
    output_size: int = 512
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    num_up_blocks: int = 4  # hard-coded in the original
    static_chunk_size: int = 0
    pre_lookahead_len: int = 3  # hard-coded in the original encoder
    upsample_stride: int = 2  # hard-coded in the original
    normalize_before: bool = True


@dataclass
class FlowEstimatorConfig:
    in_channels: int = 320
    out_channels: int = 80
    channels: list[int] = field(default_factory=lambda: [256])
    attention_head_dim: int = 64
    n_blocks: int = 4
    num_mid_blocks: int = 12
    num_heads: int = 8
    act_fn: str = "gelu"
    static_chunk_size: int = 50


@dataclass
class CosyVoiceFlowConfig:
    """``flow`` section of ``cosyvoice2.yaml`` (defaults: the CV2 release)."""

    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    vocab_size: int = 6561
    input_frame_rate: int = 25
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    inference_cfg_rate: float = 0.7
    t_scheduler: str = "cosine"
    n_timesteps: int = 10  # fixed in CausalMaskedDiffWithXvec.inference
    encoder: FlowEncoderConfig = field(default_factory=FlowEncoderConfig)
    estimator: FlowEstimatorConfig = field(default_factory=FlowEstimatorConfig)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CosyVoiceFlowConfig":
        """Build from the (tag-free) ``flow`` mapping of the yaml."""
        d = dict(d)
        enc = dict(d.pop("encoder", None) or {})
        dec = dict(d.pop("decoder", None) or {})
        est = dict(dec.pop("estimator", None) or {})
        cfm = dict(dec.pop("cfm_params", None) or {})
        cfm = dict(cfm.get("content", cfm))  # !new:omegaconf.DictConfig
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if k in cls.__dataclass_fields__ and k not in ("encoder", "estimator"):
                kw[k] = v
        if "inference_cfg_rate" in cfm:
            kw["inference_cfg_rate"] = float(cfm["inference_cfg_rate"])
        if "t_scheduler" in cfm:
            kw["t_scheduler"] = str(cfm["t_scheduler"])
        if "solver" in cfm and cfm["solver"] != "euler":
            raise ValueError(f"flow: unsupported solver {cfm['solver']!r}")
        for k, want in (
            ("input_layer", "linear"),
            ("pos_enc_layer_type", "rel_pos_espnet"),
            ("selfattention_layer_type", "rel_selfattn"),
        ):
            if k in enc and enc[k] != want:
                raise ValueError(f"flow.encoder: unsupported {k}={enc[k]!r}")
        for k in ("use_cnn_module", "macaron_style"):
            if enc.get(k):
                raise ValueError(f"flow.encoder: {k}=True is not supported")
        if enc.get("activation_type", "swish") != "swish":
            raise ValueError("flow.encoder: only swish activation")
        ekw = {k: enc[k] for k in FlowEncoderConfig.__dataclass_fields__ if k in enc}
        skw = {k: est[k] for k in FlowEstimatorConfig.__dataclass_fields__ if k in est}
        if "channels" in skw:
            skw["channels"] = list(skw["channels"])
        kw["encoder"] = FlowEncoderConfig(**ekw)
        kw["estimator"] = FlowEstimatorConfig(**skw)
        return cls(**kw)


# ------------------------------------------------------------------- masks --
def _pad_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B] lengths -> [B, 1, max_len] bool, True on valid frames."""
    r = torch.arange(max_len, device=lengths.device)
    return (r[None, :] < lengths[:, None])[:, None, :]


def _chunk_mask(valid: torch.Tensor, chunk: int) -> torch.Tensor:
    """valid [B, 1, T] -> attention mask [B, 1|T, T] (True = may attend).

    ``chunk > 0``: frame i sees frames j < (i // chunk + 1) * chunk.
    Rows left with nothing to attend to are opened fully (as the original).
    """
    if chunk <= 0:
        m = valid
    else:
        t = valid.shape[-1]
        pos = torch.arange(t, device=valid.device)
        limit = (pos // chunk + 1) * chunk
        m = valid & (pos[None, :] < limit[:, None])[None]
    # (no host sync: OR-ing in the empty rows is a no-op when there are none)
    return m | ~m.any(dim=-1, keepdim=True)


# ----------------------------------------------------------------- encoder --
class LinearEmbed(nn.Module):
    """Linear + LayerNorm input layer with the ESPnet relative positions."""

    def __init__(self, idim: int, odim: int):
        super().__init__()
        self.out = nn.Sequential(
            nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5), nn.Identity()
        )
        self.d_model = odim
        self.xscale = math.sqrt(odim)

    def rel_pos(
        self, size: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """[1, 2*size-1, d]: relative positions size-1 ... -(size-1)."""
        pos = torch.arange(size - 1, -size, -1, device=device, dtype=torch.float32)[
            :, None
        ]
        div = torch.exp(
            torch.arange(0, self.d_model, 2, device=device, dtype=torch.float32)
            * -(math.log(10000.0) / self.d_model)
        )
        pe = torch.zeros(2 * size - 1, self.d_model, device=device)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)
        return pe[None].to(dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.out(x) * self.xscale
        return x, self.rel_pos(x.shape[1], x.device, x.dtype)


class RelPositionAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions."""

    def __init__(self, n_head: int, n_feat: int):
        super().__init__()
        self.h = n_head
        self.d_k = n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        p = (
            self.linear_pos(pos_emb)
            .view(pos_emb.shape[0], -1, self.h, self.d_k)
            .transpose(1, 2)
        )
        ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        bd = torch.matmul(
            (q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1)
        )  # [B, h, T, 2T-1]
        # bd[i, j] <- bd[i, (T-1) - i + j]  (relative position i - j)
        idx = (
            torch.arange(t, device=x.device)[None, :]
            + (t - 1)
            - torch.arange(t, device=x.device)[:, None]
        )
        bd = torch.gather(bd, -1, idx.expand(bd.shape[0], bd.shape[1], t, t))
        scores = (ac + bd) / math.sqrt(self.d_k)
        blocked = ~mask[:, None]  # [B, 1, 1|T, T]
        scores = scores.masked_fill(blocked, float("-inf"))
        attn = torch.softmax(scores, dim=-1).masked_fill(blocked, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, -1)
        return self.linear_out(out)


class FeedForward(nn.Module):
    def __init__(self, idim: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden)
        self.w_2 = nn.Linear(hidden, idim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm block: rel-pos self-attention + FFN (no conv, no macaron)."""

    def __init__(self, size: int, heads: int, units: int):
        super().__init__()
        self.self_attn = RelPositionAttention(heads, size)
        self.feed_forward = FeedForward(size, units)
        self.norm_ff = nn.LayerNorm(size, eps=1e-12)
        self.norm_mha = nn.LayerNorm(size, eps=1e-12)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), mask, pos_emb)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookaheadLayer(nn.Module):
    """Right-looking conv over ``pre_lookahead_len`` future tokens + causal
    conv, residual."""

    def __init__(self, channels: int, pre_lookahead_len: int):
        super().__init__()
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(channels, channels, pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(channels, channels, 3)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = x.transpose(1, 2)
        n_ctx = 0
        if context is not None and context.shape[1] > 0:
            if context.shape[1] != self.pre_lookahead_len:
                raise ValueError(
                    f"look-ahead context must have {self.pre_lookahead_len} "
                    f"frames, got {context.shape[1]}"
                )
            h = torch.cat([h, context.transpose(1, 2)], dim=2)
            n_ctx = context.shape[1]
        h = F.pad(h, (0, self.pre_lookahead_len - n_ctx))
        h = F.leaky_relu(self.conv1(h))
        h = self.conv2(F.pad(h, (self.conv2.kernel_size[0] - 1, 0)))
        return h.transpose(1, 2) + x


class UpsampleConv(nn.Module):
    """Nearest x``stride`` upsampling then a causal conv (k = 2*stride+1)."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, stride * 2 + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return self.conv(F.pad(x, (self.stride * 2, 0)))


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, cfg: FlowEncoderConfig):
        super().__init__()
        d = cfg.output_size
        self.cfg = cfg
        self.embed = LinearEmbed(cfg.input_size, d)
        self.pre_lookahead_layer = PreLookaheadLayer(d, cfg.pre_lookahead_len)
        self.encoders = nn.ModuleList(
            ConformerLayer(d, cfg.attention_heads, cfg.linear_units)
            for _ in range(cfg.num_blocks)
        )
        self.up_layer = UpsampleConv(d, cfg.upsample_stride)
        self.up_embed = LinearEmbed(cfg.input_size, d)
        self.up_encoders = nn.ModuleList(
            ConformerLayer(d, cfg.attention_heads, cfg.linear_units)
            for _ in range(cfg.num_up_blocks)
        )
        self.after_norm = nn.LayerNorm(d, eps=1e-5)

    def forward(
        self,
        xs: torch.Tensor,
        xs_lens: torch.Tensor,
        context: torch.Tensor | None = None,
        streaming: bool = False,
        input_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """xs [B, T, D] -> [B, T * stride, D].

        ``xs_lens``: frames per item that produce output. In a padded batch
        of streaming chunks, ``input_lens`` (>= ``xs_lens``) also counts the
        look-ahead frames that follow them in ``xs`` (the batched form of
        ``context``).
        """
        stride = self.cfg.upsample_stride
        chunk = self.cfg.static_chunk_size if streaming else 0
        valid = _pad_mask(xs_lens, xs.shape[1])
        seen = valid if input_lens is None else _pad_mask(input_lens, xs.shape[1])
        xs, pos = self.embed(xs)
        if context is not None and context.shape[1] > 0:
            context = self.embed.out(context) * self.embed.xscale
        mask = _chunk_mask(valid, chunk)
        # Zero padded frames so that, in a padded batch, the look-ahead conv
        # of a shorter item sees zeros past its end exactly as when it runs
        # alone (a no-op without padding).
        xs = xs * seen.transpose(1, 2).to(xs.dtype)
        xs = self.pre_lookahead_layer(xs, context)
        for layer in self.encoders:
            xs = layer(xs, mask, pos)
        xs = self.up_layer(xs.transpose(1, 2)).transpose(1, 2)
        valid = _pad_mask(xs_lens * stride, xs.shape[1])
        xs, pos = self.up_embed(xs)
        mask = _chunk_mask(valid, chunk * stride)
        for layer in self.up_encoders:
            xs = layer(xs, mask, pos)
        return self.after_norm(xs)


# --------------------------------------------------------- UNet estimator --
class CausalConv1d(nn.Conv1d):
    """Conv1d left-padded by kernel_size - 1 (stride 1)."""

    def __init__(self, cin: int, cout: int, kernel_size: int):
        super().__init__(cin, cout, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel dim of [B, C, T]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class CausalBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.block = nn.Sequential(
            CausalConv1d(dim, dim_out, 3),
            nn.Identity(),
            ChannelLayerNorm(dim_out),
            nn.Identity(),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x * mask) * mask


class CausalResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_emb_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        h = self.block1(x, mask) + self.mlp(t)[:, :, None]
        h = self.block2(h, mask)
        return h + self.res_conv(x * mask)


class _Attention(nn.Module):
    """diffusers-style self-attention (to_q/to_k/to_v, to_out.0)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.to_q(x)),
            heads(self.to_k(x)),
            heads(self.to_v(x)),
            attn_mask=bias[:, None],
        )
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, -1))


class _GELUProj(nn.Module):
    def __init__(self, dim: int, inner: int, approximate: str):
        super().__init__()
        self.proj = nn.Linear(dim, inner)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, act_fn: str, mult: int = 4):
        super().__init__()
        if act_fn == "gelu":
            act = _GELUProj(dim, dim * mult, "none")
        elif act_fn == "gelu-approximate":
            act = _GELUProj(dim, dim * mult, "tanh")
        else:
            raise ValueError(f"flow estimator: unsupported act_fn {act_fn!r}")
        self.net = nn.ModuleList([act, nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.net:
            x = m(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-LN self-attention + GELU FFN (diffusers BasicTransformerBlock)."""

    def __init__(self, dim: int, heads: int, dim_head: int, act_fn: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = _Attention(dim, heads, dim_head)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = _FeedForward(dim, act_fn)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), bias)
        return x + self.ff(self.norm3(x))


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.in_channels = in_channels
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def sinusoidal(self, t: torch.Tensor, scale: float = 1000.0):
        half = self.in_channels // 2
        freq = torch.exp(
            torch.arange(half, device=t.device).float()
            * -(math.log(10000) / (half - 1))
        )
        arg = scale * t[:, None].float() * freq[None]
        return torch.cat([arg.sin(), arg.cos()], dim=-1).to(t.dtype)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(self.sinusoidal(t))))


class _Downsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CausalConditionalDecoder(nn.Module):
    """The causal 1-D UNet velocity estimator (``CausalConditionalDecoder``)."""

    def __init__(self, cfg: FlowEstimatorConfig):
        super().__init__()
        self.cfg = cfg
        channels = tuple(cfg.channels)
        temb = channels[0] * 4
        self.time_mlp = TimestepEmbedding(cfg.in_channels, temb)

        def tblocks(dim: int) -> nn.ModuleList:
            return nn.ModuleList(
                TransformerBlock(dim, cfg.num_heads, cfg.attention_head_dim, cfg.act_fn)
                for _ in range(cfg.n_blocks)
            )

        self.down_blocks = nn.ModuleList()
        out_ch = cfg.in_channels
        for i, ch in enumerate(channels):
            in_ch, out_ch = out_ch, ch
            last = i == len(channels) - 1
            self.down_blocks.append(
                nn.ModuleList(
                    [
                        CausalResnetBlock1D(in_ch, out_ch, temb),
                        tblocks(out_ch),
                        CausalConv1d(out_ch, out_ch, 3)
                        if last
                        else _Downsample(out_ch),
                    ]
                )
            )
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList(
                [CausalResnetBlock1D(channels[-1], out_ch, temb), tblocks(out_ch)]
            )
            for _ in range(cfg.num_mid_blocks)
        )
        up = channels[::-1] + (channels[0],)
        self.up_blocks = nn.ModuleList()
        for i in range(len(up) - 1):
            last = i == len(up) - 2
            self.up_blocks.append(
                nn.ModuleList(
                    [
                        CausalResnetBlock1D(up[i] * 2, up[i + 1], temb),
                        tblocks(up[i + 1]),
                        CausalConv1d(up[i + 1], up[i + 1], 3)
                        if last
                        else _Upsample(up[i + 1]),
                    ]
                )
            )
        self.final_block = CausalBlock1D(up[-1], up[-1])
        self.final_proj = nn.Conv1d(up[-1], cfg.out_channels, 1)

    def _bias(
        self, mask: torch.Tensor, streaming: bool, dtype: torch.dtype
    ) -> torch.Tensor:
        m = _chunk_mask(mask.bool(), self.cfg.static_chunk_size if streaming else 0)
        m = m.expand(m.shape[0], mask.shape[-1], mask.shape[-1])
        return (1.0 - m.to(dtype)) * -1.0e10

    def _transformers(
        self,
        blocks: nn.ModuleList,
        x: torch.Tensor,
        mask: torch.Tensor,
        streaming: bool,
        biases: dict[int, torch.Tensor],
    ) -> torch.Tensor:
        t = mask.shape[-1]
        if t not in biases:  # one bias per resolution per call
            biases[t] = self._bias(mask, streaming, x.dtype)
        bias = biases[t]
        x = x.transpose(1, 2)
        for blk in blocks:
            x = blk(x, bias)
        return x.transpose(1, 2)

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
        temb = self.time_mlp(t)
        x = torch.cat(
            [x, mu, spks[:, :, None].expand(-1, -1, x.shape[-1]), cond], dim=1
        )
        hiddens = []
        masks = [mask]
        biases: dict[int, torch.Tensor] = {}
        for resnet, blocks, down in self.down_blocks:
            m = masks[-1]
            x = resnet(x, m, temb)
            x = self._transformers(blocks, x, m, streaming, biases)
            hiddens.append(x)
            x = down(x * m)
            masks.append(m[:, :, ::2])
        masks = masks[:-1]
        m = masks[-1]
        for resnet, blocks in self.mid_blocks:
            x = resnet(x, m, temb)
            x = self._transformers(blocks, x, m, streaming, biases)
        for resnet, blocks, upsample in self.up_blocks:
            m = masks.pop()
            skip = hiddens.pop()
            x = torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1)
            x = resnet(x, m, temb)
            x = self._transformers(blocks, x, m, streaming, biases)
            x = upsample(x * m)
        x = self.final_block(x, m)
        return self.final_proj(x * m) * mask


class CausalConditionalCFM(nn.Module):
    """Euler ODE solver with classifier-free guidance over the estimator."""

    def __init__(self, cfg: CosyVoiceFlowConfig):
        super().__init__()
        self.inference_cfg_rate = cfg.inference_cfg_rate
        self.t_scheduler = cfg.t_scheduler
        self.n_mels = cfg.output_size
        self.estimator = CausalConditionalDecoder(cfg.estimator)
        # The original's fixed initial noise (drawn once, seed 0). Not part
        # of the state dict.
        g = torch.Generator().manual_seed(_NOISE_SEED)
        self.register_buffer(
            "rand_noise",
            torch.randn(1, self.n_mels, _NOISE_FRAMES, generator=g),
            persistent=False,
        )

    def fixed_noise(
        self, frames: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """The original's fixed initial noise, [1, n_mels, frames]."""
        if frames > _NOISE_FRAMES:
            raise ValueError(
                f"flow: {frames} mel frames exceed the original's fixed "
                f"noise ({_NOISE_FRAMES} frames = 300 s); split the input"
            )
        return self.rand_noise[:, :, :frames].to(device=device, dtype=dtype)

    def t_span(
        self, n_timesteps: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        t = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=dtype)
        if self.t_scheduler == "cosine":
            t = 1 - torch.cos(t * 0.5 * torch.pi)
        elif self.t_scheduler != "linear":
            raise ValueError(f"flow: unknown t_scheduler {self.t_scheduler}")
        return t

    def forward(
        self,
        mu: torch.Tensor,
        mask: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        n_timesteps: int,
        streaming: bool = False,
        temperature: float = 1.0,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """mu/cond [B, 80, T], mask [B, 1, T], spks [B, 80] -> mel."""
        b, _, t = mu.shape
        if noise is None:
            noise = self.fixed_noise(t, mu.device, mu.dtype).expand(b, -1, -1)
        x = noise * temperature
        span = self.t_span(n_timesteps, mu.device, mu.dtype)
        tt, dt = span[0], span[1] - span[0]
        mask2 = torch.cat([mask, mask])
        mu2 = torch.cat([mu, torch.zeros_like(mu)])
        spks2 = torch.cat([spks, torch.zeros_like(spks)])
        cond2 = torch.cat([cond, torch.zeros_like(cond)])
        w = self.inference_cfg_rate
        for step in range(1, len(span)):
            v = self.estimator(
                torch.cat([x, x]), mask2, mu2, tt.expand(2 * b), spks2, cond2, streaming
            )
            v_c, v_u = v[:b], v[b:]
            x = x + dt * ((1.0 + w) * v_c - w * v_u)
            tt = tt + dt
            if step < len(span) - 1:
                dt = span[step + 1] - tt
        return x.float()


# ------------------------------------------------------- batched inputs --
@dataclass
class FlowBatch:
    """Padded inputs of a batched flow call (both CosyVoice2 and 3).

    ``lens``: prompt + new tokens per item; ``out_lens``: the tokens that
    produce frames (``lens`` minus the look-ahead for a non-final chunk).
    """

    x: torch.Tensor  # [B, L, D] token embeddings, zero past each item's end
    lens: torch.Tensor  # [B]
    out_lens: torch.Tensor  # [B]


def flow_batch_inputs(
    flow: nn.Module,
    tokens: Sequence[torch.Tensor],
    prompt_tokens: Sequence[torch.Tensor],
    prompt_feats: Sequence[torch.Tensor],
    embeddings: torch.Tensor,
    finalize: bool,
) -> FlowBatch:
    b = len(tokens)
    if not (len(prompt_tokens) == len(prompt_feats) == b == embeddings.shape[0]):
        raise ValueError("flow.forward_batch: inconsistent batch sizes")
    dev = flow.input_embedding.weight.device
    seqs = [
        torch.cat([p.reshape(-1).to(dev), t.reshape(-1).to(dev)]).long()
        for p, t in zip(prompt_tokens, tokens)
    ]
    vocab = flow.input_embedding.num_embeddings
    n_ctx = 0 if finalize else flow.pre_lookahead_len
    for s in seqs:
        if s.numel() and int(s.max()) >= vocab:
            raise ValueError(
                f"flow: speech token {int(s.max())} out of range [0, {vocab})"
            )
        if len(s) <= n_ctx:
            raise ValueError(
                f"flow: a non-final chunk needs more than {n_ctx} tokens "
                f"(the last {n_ctx} are look-ahead), got {len(s)}"
            )
    lens = torch.tensor([len(x) for x in seqs], device=dev)
    tok = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    valid = _pad_mask(lens, tok.shape[1]).transpose(1, 2)  # [B, L, 1]
    x = flow.input_embedding(tok.clamp(min=0)) * valid
    return FlowBatch(x, lens, lens - n_ctx)


def flow_batch_conds(
    prompt_feats: Sequence[torch.Tensor],
    out_frames: torch.Tensor,
    h: torch.Tensor,
    n_mels: int,
) -> tuple[torch.Tensor, list[int]]:
    """The prompt-mel conditioning [B, T, n_mels] of a padded batch and
    where each item's new frames start."""
    conds = torch.zeros(h.shape[0], h.shape[1], n_mels, device=h.device, dtype=h.dtype)
    starts = []
    for i, pf in enumerate(prompt_feats):
        pf = pf.reshape(-1, n_mels).to(h.device)
        if pf.shape[0] > int(out_frames[i]):
            raise ValueError(
                f"flow: prompt mel of item {i} ({pf.shape[0]} frames) is "
                f"longer than its encoded tokens ({int(out_frames[i])} frames)"
            )
        conds[i, : pf.shape[0]] = pf
        starts.append(pf.shape[0])
    return conds, starts


# -------------------------------------------------------------------- flow --
class TokenMelFlow(nn.Module):
    """What the CosyVoice2 and CosyVoice3 flows share: speech tokens (+ the
    prompt's) are embedded, encoded to mel-rate features (``_encode`` /
    ``_encode_batch``: the subclass's encoder, projected to the mel size),
    and the CFM decoder turns them into mel, conditioned on the prompt mel
    and the speaker x-vector. Subclasses set ``config`` and the modules
    ``input_embedding``, ``spk_embed_affine_layer`` and ``decoder``."""

    def _init_common(self, cfg: Any) -> None:
        self.config = cfg
        self.output_size = cfg.output_size
        self.token_mel_ratio = cfg.token_mel_ratio
        self.pre_lookahead_len = cfg.pre_lookahead_len
        self.input_frame_rate = cfg.input_frame_rate
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)

    @property
    def token_rate(self) -> int:
        return self.input_frame_rate

    @property
    def mel_rate(self) -> int:
        return self.input_frame_rate * self.token_mel_ratio

    def _encode(self, x: torch.Tensor, finalize: bool, streaming: bool) -> torch.Tensor:
        """Embedded tokens [1, N, D] -> features [1, T_mel, output_size]
        (``finalize=False``: the last ``pre_lookahead_len`` tokens are
        look-ahead only)."""
        raise NotImplementedError

    def _encode_batch(self, fb: "FlowBatch", streaming: bool) -> torch.Tensor:
        """``_encode`` of a padded batch -> [B, T_mel, output_size]."""
        raise NotImplementedError

    def _speaker(self, embedding: torch.Tensor, dev: torch.device) -> torch.Tensor:
        if embedding.shape[-1] != self.config.spk_embed_dim:
            raise ValueError(
                f"flow: speaker embedding must have {self.config.spk_embed_dim} "
                f"dims, got {embedding.shape[-1]}"
            )
        emb = F.normalize(embedding.to(dev).float(), dim=1)
        return self.spk_embed_affine_layer(emb)

    def _decode(
        self,
        h: torch.Tensor,
        mask: torch.Tensor,
        spk: torch.Tensor,
        conds: torch.Tensor,
        streaming: bool,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.decoder(
            mu=h.transpose(1, 2).contiguous(),
            mask=mask,
            spks=spk,
            cond=conds.transpose(1, 2),
            n_timesteps=self.config.n_timesteps,
            streaming=streaming,
            noise=noise,
        )

    @torch.inference_mode()
    def forward(
        self,
        token: torch.Tensor,
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        streaming: bool = False,
        finalize: bool = True,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mel [1, 80, T_new] for ``token`` [1, N] after the prompt.

        prompt_token [1, P] (may be empty), prompt_feat [1, 2P, 80] (the
        prompt mel, 50 Hz), embedding [1, 192] (CAM++ x-vector). With
        ``finalize=False`` the last ``pre_lookahead_len`` tokens are only
        look-ahead context and produce no frames. ``streaming``: the
        encoder's / estimator's chunk masks (``static_chunk_size``).
        """
        if token.shape[0] != 1:
            raise ValueError("flow: batch size 1 only (as the original)")
        dev = self.input_embedding.weight.device
        spk = self._speaker(embedding, dev)
        tok = torch.cat([prompt_token.to(dev), token.to(dev)], dim=1).long()
        vocab = self.input_embedding.num_embeddings
        if tok.numel() and int(tok.max()) >= vocab:
            raise ValueError(
                f"flow: speech token {int(tok.max())} out of range [0, {vocab})"
            )
        n = self.pre_lookahead_len
        if not finalize and tok.shape[1] <= n:
            raise ValueError(
                f"flow: a non-final chunk needs more than {n} tokens "
                f"(the last {n} are look-ahead), got {tok.shape[1]}"
            )
        h = self._encode(self.input_embedding(tok.clamp(min=0)), finalize, streaming)
        prompt_feat = prompt_feat.to(dev)
        mel_len1 = prompt_feat.shape[1]
        if mel_len1 > h.shape[1]:
            raise ValueError(
                f"flow: prompt mel ({mel_len1} frames) is longer than the "
                f"encoded tokens ({h.shape[1]} frames)"
            )
        conds = torch.zeros(1, h.shape[1], self.output_size, device=dev, dtype=h.dtype)
        conds[:, :mel_len1] = prompt_feat
        mask = torch.ones(1, 1, h.shape[1], device=dev, dtype=h.dtype)
        feat = self._decode(h, mask, spk, conds, streaming, noise)
        return feat[:, :, mel_len1:]

    inference = forward

    @torch.inference_mode()
    def forward_batch(
        self,
        tokens: Sequence[torch.Tensor],
        prompt_tokens: Sequence[torch.Tensor],
        prompt_feats: Sequence[torch.Tensor],
        embeddings: torch.Tensor,
        streaming: bool = False,
        finalize: bool = True,
    ) -> list[torch.Tensor]:
        """:meth:`forward` for several utterances (or streaming chunks of
        several sessions) at once, padded to the longest.

        tokens[i] [N_i], prompt_tokens[i] [P_i], prompt_feats[i] [2 P_i, 80],
        embeddings [B, 192]. Returns the new mel [80, 2 N_i'] per item
        (N_i' = N_i, minus the look-ahead with ``finalize=False``), equal (up
        to float rounding) to :meth:`forward` on each item alone: every op
        either masks padded frames or only looks left of them, padded tokens
        embed to zeros (what the look-ahead conv sees past an item's end
        when it runs alone), and the fixed noise of frame t does not depend
        on the length.
        """
        fb = flow_batch_inputs(
            self, tokens, prompt_tokens, prompt_feats, embeddings, finalize
        )
        h = self._encode_batch(fb, streaming)
        ratio = h.shape[1] // fb.x.shape[1]
        conds, starts = flow_batch_conds(
            prompt_feats, fb.out_lens * ratio, h, self.output_size
        )
        mask = _pad_mask(fb.out_lens * ratio, h.shape[1]).to(h.dtype)
        spk = self._speaker(embeddings, h.device)
        feat = self._decode(h, mask, spk, conds, streaming)
        return [
            feat[i, :, starts[i] : ratio * int(fb.out_lens[i])]
            for i in range(len(starts))
        ]


class CausalMaskedDiffWithXvec(TokenMelFlow):
    """CosyVoice2 flow: speech tokens (+ prompt) -> mel of the new tokens;
    the causal upsampling conformer encoder, the UNet CFM estimator."""

    def __init__(self, config: CosyVoiceFlowConfig | None = None):
        super().__init__()
        cfg = config or CosyVoiceFlowConfig()
        self._init_common(cfg)
        self.encoder = UpsampleConformerEncoder(cfg.encoder)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.decoder = CausalConditionalCFM(cfg)

    def _encode(self, x: torch.Tensor, finalize: bool, streaming: bool) -> torch.Tensor:
        tok_len = torch.tensor([x.shape[1]], device=x.device)
        if finalize:
            h = self.encoder(x, tok_len, streaming=streaming)
        else:
            n = self.pre_lookahead_len
            h = self.encoder(x[:, :-n], tok_len, context=x[:, -n:], streaming=streaming)
        return self.encoder_proj(h)

    def _encode_batch(self, fb: "FlowBatch", streaming: bool) -> torch.Tensor:
        h = self.encoder(fb.x, fb.out_lens, streaming=streaming, input_lens=fb.lens)
        return self.encoder_proj(h)


def load_flow(
    state_dict: Mapping[str, torch.Tensor], config: CosyVoiceFlowConfig | None = None
) -> CausalMaskedDiffWithXvec:
    """Build the flow from an original ``flow.pt`` state dict."""
    model = CausalMaskedDiffWithXvec(config)
    load_strict(model, state_dict, "flow.pt")
    return model.eval()


__all__: Sequence[str] = [
    "CosyVoiceFlowConfig",
    "FlowEncoderConfig",
    "FlowEstimatorConfig",
    "CausalMaskedDiffWithXvec",
    "load_flow",
]
