# SPDX-License-Identifier: Apache-2.0
"""HiFT vocoder of CosyVoice2 (mel at 50 Hz -> 24 kHz waveform).

A plain-PyTorch implementation of CosyVoice2's ``HiFTGenerator`` (HiFTNet: a
neural-source-filter excitation driven by a predicted F0, a HiFi-GAN style
upsampler fused with the STFT of that excitation, and an inverse STFT head).

Module and parameter names follow the original so that a released ``hift.pt``
state dict loads with ``strict=True`` (a leading ``generator.`` prefix, as in
some release files, is stripped; legacy ``weight_g``/``weight_v`` weight-norm
keys are accepted through torch's weight-norm compatibility hook).

The excitation draws random numbers (an initial phase per harmonic and the
additive noise). They are drawn in the same order and with the same shapes as
the original, from ``generator`` (or torch's global RNG when it is ``None``),
or they can be given explicitly, so that tests can reproduce the original
output exactly.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from vllm.logger import init_logger

logger = init_logger(__name__)


@dataclass
class HiFTConfig:
    """``hift`` section of ``cosyvoice2.yaml`` (defaults: the CV2 release)."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: list[int] = field(default_factory=lambda: [8, 5, 3])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [16, 11, 7])
    istft_n_fft: int = 16
    istft_hop_len: int = 4
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(
        default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    )
    source_resblock_kernel_sizes: list[int] = field(default_factory=lambda: [7, 7, 11])
    source_resblock_dilation_sizes: list[list[int]] = field(
        default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    )
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_num_class: int = 1
    f0_in_channels: int = 80
    f0_cond_channels: int = 512

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HiFTConfig":
        """Build from the (tag-free) ``hift`` mapping of the yaml."""
        d = dict(d)
        kw: dict[str, Any] = {}
        istft = d.pop("istft_params", None)
        if istft is not None:
            kw["istft_n_fft"] = int(istft["n_fft"])
            kw["istft_hop_len"] = int(istft["hop_len"])
        f0 = d.pop("f0_predictor", None)
        if isinstance(f0, Mapping):
            if "num_class" in f0:
                kw["f0_num_class"] = int(f0["num_class"])
            if "in_channels" in f0:
                kw["f0_in_channels"] = int(f0["in_channels"])
            if "cond_channels" in f0:
                kw["f0_cond_channels"] = int(f0["cond_channels"])
        names = set(cls.__dataclass_fields__)
        for k, v in d.items():
            if k in names:
                kw[k] = v
            else:
                logger.debug("HiFTConfig: ignoring yaml key %r", k)
        return cls(**kw)

    @property
    def upsample_factor(self) -> int:
        """Waveform samples per mel frame (480 for CV2)."""
        return math.prod(self.upsample_rates) * self.istft_hop_len


def _wn_conv1d(*args, **kwargs) -> nn.Conv1d:
    return weight_norm(nn.Conv1d(*args, **kwargs))


class CausalConv1d(nn.Conv1d):
    """Stride-1 Conv1d zero-padded on one side only (CosyVoice3's causal HiFT).

    ``side="left"``: causal; ``side="right"``: looks ``causal_padding``
    frames ahead. The pad width is the original's formula (``(k-1)*d`` for
    the kernels used). ``context`` (exactly ``causal_padding`` frames) takes
    the place of the zero padding, for streaming look-ahead.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int = 1,
        side: str = "left",
    ):
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)
        if side not in ("left", "right"):
            raise ValueError(f"CausalConv1d: side must be left|right, got {side!r}")
        self.side = side
        span = (kernel_size - 1) * dilation
        self.causal_padding = (span // 2) * 2 + (kernel_size + 1) % 2
        if self.causal_padding != span:
            raise ValueError(
                f"CausalConv1d: kernel {kernel_size} with dilation {dilation} "
                "does not keep the length (not supported by the original)"
            )

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        if context is None:
            n = self.causal_padding
            return super().forward(F.pad(x, (n, 0) if self.side == "left" else (0, n)))
        if context.shape[-1] != self.causal_padding:
            raise ValueError(
                f"CausalConv1d: context must have {self.causal_padding} frames, "
                f"got {context.shape[-1]}"
            )
        parts = [context, x] if self.side == "left" else [x, context]
        return super().forward(torch.cat(parts, dim=-1))


class CausalConv1dDownSample(nn.Conv1d):
    """Strided Conv1d (kernel 2*stride) left-padded by stride - 1."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__(in_channels, out_channels, 2 * stride, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.stride[0] - 1, 0)))


class CausalConv1dUpsample(nn.Conv1d):
    """Nearest x``rate`` upsampling, then a causal stride-1 conv."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, rate: int
    ):
        super().__init__(in_channels, out_channels, kernel_size)
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=float(self.rate), mode="nearest")
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha, with a per-channel linear-scale alpha."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha[None, :, None]
        return x + torch.sin(x * a).pow(2) * (1.0 / (a + 1e-9))


class ResBlock(nn.Module):
    """Dilated residual block with Snake activations (HiFi-GAN/BigVGAN);
    ``causal=True``: left-padded convs (CosyVoice3)."""

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        dilations: Sequence[int],
        causal: bool = False,
    ):
        super().__init__()

        def conv(d: int) -> nn.Conv1d:
            if causal:
                return weight_norm(
                    CausalConv1d(channels, channels, kernel_size, dilation=d)
                )
            return _wn_conv1d(
                channels,
                channels,
                kernel_size,
                1,
                dilation=d,
                padding=(kernel_size * d - d) // 2,
            )

        self.convs1 = nn.ModuleList(conv(d) for d in dilations)
        self.convs2 = nn.ModuleList(conv(1) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(
            self.convs1, self.convs2, self.activations1, self.activations2
        ):
            x = x + c2(a2(c1(a1(x))))
        return x


class ConvRNNF0Predictor(nn.Module):
    """Five weight-normed k=3 convs with ELU, then a linear head; |f0| in Hz."""

    def __init__(
        self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512
    ):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers.append(
                _wn_conv1d(
                    in_channels if i == 0 else cond_channels,
                    cond_channels,
                    kernel_size=3,
                    padding=1,
                )
            )
            layers.append(nn.ELU())
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        h = self.condnet(mel).transpose(1, 2)
        return self.classifier(h).squeeze(-1).abs()


class SineGen(nn.Module):
    """Harmonic sine excitation with the phase integrated at frame rate.

    (The original's ``SineGen2``, used for every sampling rate but 22050.)
    The phase increments are averaged down to the frame rate (linear
    interpolation by 1/upsample), integrated there, and interpolated back up
    (linearly; ``causal=True``, the CosyVoice3 variant: nearest, so that a
    sample never depends on the next frame).
    """

    def __init__(
        self,
        sampling_rate: int,
        upsample_scale: int,
        harmonic_num: int,
        sine_amp: float,
        noise_std: float,
        voiced_threshold: float,
        causal: bool = False,
    ):
        super().__init__()
        self.sampling_rate = sampling_rate
        self.upsample_scale = upsample_scale
        self.dim = harmonic_num + 1
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.voiced_threshold = voiced_threshold
        self.phase_upsample_mode = "nearest" if causal else "linear"

    def forward(
        self,
        f0: torch.Tensor,
        generator: torch.Generator | None = None,
        phase_init: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """f0: [B, L, 1] Hz at sample rate -> (excitation [B, L, dim], uv).

        ``phase_init`` [B, dim] (uniform in [0, 1), column 0 is zeroed) and
        ``noise`` [B, L, dim] (standard normal) default to draws from
        ``generator`` in that order, as the original draws them (the noise
        is drawn into a transposed [B, dim, L] buffer, as the original).
        """
        b, length, _ = f0.shape
        harmonics = torch.arange(1, self.dim + 1, device=f0.device, dtype=f0.dtype)
        fn = f0 * harmonics  # [B, L, dim]
        rad = torch.remainder(fn / self.sampling_rate, 1.0)
        # Draw on the generator's device (a CPU generator gives the same
        # numbers whatever device the model runs on).
        rng_dev = generator.device if generator is not None else f0.device
        if phase_init is None:
            phase_init = torch.rand(
                b, self.dim, generator=generator, device=rng_dev, dtype=f0.dtype
            )
        phase_init = phase_init.to(f0.device).clone()
        phase_init[:, 0] = 0
        rad = rad.clone()
        rad[:, 0, :] = rad[:, 0, :] + phase_init
        rad = F.interpolate(
            rad.transpose(1, 2), scale_factor=1.0 / self.upsample_scale, mode="linear"
        )
        phase = torch.cumsum(rad, dim=2) * (2 * math.pi)
        phase = F.interpolate(
            phase * self.upsample_scale,
            scale_factor=float(self.upsample_scale),
            mode=self.phase_upsample_mode,
        ).transpose(1, 2)
        sines = torch.sin(phase) * self.sine_amp
        uv = (f0 > self.voiced_threshold).to(f0.dtype)
        if noise is None:
            # The original draws with randn_like() on a [B, L, dim] view of a
            # [B, dim, L] buffer; normal_() on such a strided view takes a
            # different (non-vectorized) path than on a contiguous tensor,
            # so draw into the same layout to reproduce its values.
            noise = (
                torch.empty(b, self.dim, length, device=rng_dev, dtype=f0.dtype)
                .transpose(1, 2)
                .normal_(generator=generator)
            )
        noise = noise.to(f0.device)
        noise_amp = uv * self.noise_std + (1 - uv) * (self.sine_amp / 3)
        return sines * uv + noise_amp * noise, uv


class SourceModuleHnNSF(nn.Module):
    """Merges the harmonic excitations into one source signal (tanh(linear))."""

    def __init__(
        self,
        sampling_rate: int,
        upsample_scale: int,
        harmonic_num: int,
        sine_amp: float,
        add_noise_std: float,
        voiced_threshold: float,
        causal: bool = False,
    ):
        super().__init__()
        self.l_sin_gen = SineGen(
            sampling_rate,
            upsample_scale,
            harmonic_num,
            sine_amp,
            add_noise_std,
            voiced_threshold,
            causal=causal,
        )
        self.l_linear = nn.Linear(harmonic_num + 1, 1)

    def forward(
        self,
        f0: torch.Tensor,
        generator: torch.Generator | None = None,
        phase_init: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        draw = noise is None
        sines, uv = self.l_sin_gen(f0, generator, phase_init, noise)
        if draw:
            # The original also draws a noise-branch tensor here that the
            # vocoder never uses; draw (and drop) it too so that successive
            # calls (streaming chunks) consume the RNG stream identically.
            rng_dev = generator.device if generator is not None else uv.device
            torch.empty_like(uv, device=rng_dev).normal_(generator=generator)
        return torch.tanh(self.l_linear(sines))


class HiFTGenerator(nn.Module):
    """CosyVoice2 HiFT vocoder: mel [B, 80, T] -> waveform [B, T * 480]."""

    causal: bool = False  # CausalHiFTGenerator: True

    def __init__(self, config: HiFTConfig | None = None):
        super().__init__()
        cfg = config or HiFTConfig()
        if cfg.sampling_rate == 22050:
            raise NotImplementedError(
                "HiFT with sampling_rate 22050 (CosyVoice 1) uses a different "
                "sine generator; only the CosyVoice2 variant is implemented"
            )
        if not (
            len(cfg.upsample_rates)
            == len(cfg.upsample_kernel_sizes)
            == len(cfg.source_resblock_kernel_sizes)
            == len(cfg.source_resblock_dilation_sizes)
        ):
            raise ValueError(
                "HiFT: upsample_rates, upsample_kernel_sizes and "
                "source_resblock_* must have the same length"
            )
        self.config = cfg
        self.sampling_rate = cfg.sampling_rate
        self.upsample_factor = cfg.upsample_factor
        self.n_fft = cfg.istft_n_fft
        self.hop_len = cfg.istft_hop_len
        self.lrelu_slope = cfg.lrelu_slope
        self.audio_limit = cfg.audio_limit
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.num_upsamples = len(cfg.upsample_rates)
        base = cfg.base_channels

        self.m_source = SourceModuleHnNSF(
            sampling_rate=cfg.sampling_rate,
            upsample_scale=self.upsample_factor,
            harmonic_num=cfg.nb_harmonics,
            sine_amp=cfg.nsf_alpha,
            add_noise_std=cfg.nsf_sigma,
            voiced_threshold=cfg.nsf_voiced_threshold,
            causal=self.causal,
        )
        self.conv_pre = self._make_conv_pre(cfg.in_channels, base)
        self.ups = nn.ModuleList()
        for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            self.ups.append(self._make_up(base // 2**i, base // 2 ** (i + 1), k, u))

        # The excitation's STFT is brought to each stage's frame rate.
        n_stft = self.n_fft + 2
        down_rates = [1] + list(cfg.upsample_rates[::-1][:-1])
        cum = [math.prod(down_rates[: i + 1]) for i in range(len(down_rates))]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(
            zip(
                cum[::-1],
                cfg.source_resblock_kernel_sizes,
                cfg.source_resblock_dilation_sizes,
            )
        ):
            ch = base // 2 ** (i + 1)
            self.source_downs.append(self._make_source_down(n_stft, ch, u))
            self.source_resblocks.append(ResBlock(ch, k, d, causal=self.causal))

        self.resblocks = nn.ModuleList()
        for i in range(self.num_upsamples):
            ch = base // 2 ** (i + 1)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(ResBlock(ch, k, d, causal=self.causal))
        self.conv_post = self._make_conv_post(ch, n_stft)
        self.f0_predictor = self._make_f0_predictor(cfg)
        self.register_buffer(
            "stft_window",
            torch.hann_window(self.n_fft, periodic=True, dtype=torch.float64).float(),
            persistent=False,
        )

    # Layer factories: the causal generator (CosyVoice3) overrides them; the
    # parameter names and shapes stay those of the original either way.
    def _make_conv_pre(self, cin: int, cout: int) -> nn.Module:
        return _wn_conv1d(cin, cout, 7, 1, padding=3)

    def _make_up(self, cin: int, cout: int, kernel: int, rate: int) -> nn.Module:
        return weight_norm(
            nn.ConvTranspose1d(cin, cout, kernel, rate, padding=(kernel - rate) // 2)
        )

    def _make_source_down(self, cin: int, cout: int, rate: int) -> nn.Module:
        if rate == 1:
            return nn.Conv1d(cin, cout, 1, 1)
        return nn.Conv1d(cin, cout, rate * 2, rate, padding=rate // 2)

    def _make_conv_post(self, cin: int, cout: int) -> nn.Module:
        return _wn_conv1d(cin, cout, 7, 1, padding=3)

    def _make_f0_predictor(self, cfg: HiFTConfig) -> nn.Module:
        return ConvRNNF0Predictor(
            cfg.f0_num_class, cfg.f0_in_channels, cfg.f0_cond_channels
        )

    # ------------------------------------------------------------------
    def fold_weight_norm(self) -> None:
        """Bake weight norm into plain weights (faster inference).

        Call after loading; the state dict then no longer has the original
        ``parametrizations.*`` keys.
        """
        for m in self.modules():
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(
                    m, "weight", leave_parametrized=True
                )

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(
            x,
            self.n_fft,
            self.hop_len,
            self.n_fft,
            window=self.stft_window.to(x.dtype),
            return_complex=True,
        )
        return torch.cat([spec.real, spec.imag], dim=1)

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        magnitude = magnitude.clamp(max=1e2)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(
            spec,
            self.n_fft,
            self.hop_len,
            self.n_fft,
            window=self.stft_window.to(magnitude.dtype),
        )

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """mel [B, C, T], source [B, 1, T * upsample] -> waveform [B, L]."""
        s_stft = self._stft(source.squeeze(1))
        return self._decode_stages(self.conv_pre(mel), s_stft)

    def _decode_stages(self, x: torch.Tensor, s_stft: torch.Tensor) -> torch.Tensor:
        """conv_pre output + excitation STFT -> clamped waveform."""
        for i in range(self.num_upsamples):
            x = F.leaky_relu(x, self.lrelu_slope)
            x = self.ups[i](x)
            if i == self.num_upsamples - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            si = self.source_resblocks[i](self.source_downs[i](s_stft))
            x = x + si
            xs = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                xs = xs + self.resblocks[i * self.num_kernels + j](x)
            x = xs / self.num_kernels
        x = F.leaky_relu(x)  # default slope 0.01, as in the original
        x = self.conv_post(x)
        nb = self.n_fft // 2 + 1
        magnitude = torch.exp(x[:, :nb])
        phase = torch.sin(x[:, nb:])
        wav = self._istft(magnitude, phase)
        return wav.clamp(-self.audio_limit, self.audio_limit)

    def source(
        self,
        mel: torch.Tensor,
        generator: torch.Generator | None = None,
        phase_init: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The NSF excitation [B, 1, T * upsample] for mel [B, C, T]."""
        f0 = self.f0_predictor(mel)  # [B, T]
        # Same layout as the original ([B, 1, L] viewed as [B, L, 1]), which
        # matters for reproducing its random draws.
        f0 = F.interpolate(
            f0[:, None], scale_factor=float(self.upsample_factor), mode="nearest"
        ).transpose(1, 2)
        return self.m_source(f0, generator, phase_init, noise).transpose(1, 2)

    def draw_excitation(
        self,
        frames: int,
        generator: torch.Generator | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The random draws :meth:`forward` makes for one [1, 80, frames]
        mel, in the same order from the same RNG: (phase_init [1, dim],
        noise [1, frames * upsample, dim]). Lets a batch of utterances, each
        with its own generator, be vocoded in one call with the audio each
        would get alone."""
        length = frames * self.upsample_factor
        dim = self.m_source.l_sin_gen.dim
        rng_dev = generator.device if generator is not None else device
        phase = torch.rand(1, dim, generator=generator, device=rng_dev, dtype=dtype)
        noise = (
            torch.empty(1, dim, length, device=rng_dev, dtype=dtype)
            .transpose(1, 2)
            .normal_(generator=generator)
        )
        # the unused noise-branch draw of SourceModuleHnNSF.forward
        torch.empty(1, length, 1, device=rng_dev, dtype=dtype).normal_(
            generator=generator
        )
        return phase.to(device), noise.to(device)

    @torch.inference_mode()
    def forward(
        self,
        mel: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        phase_init: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vocode ``mel`` [B, 80, T] (50 Hz) -> (waveform [B, T*480], source).

        ``cache_source`` [B, 1, n] overwrites the first n samples of the
        excitation (continuity between streaming chunks, as the original).
        Random draws: see :meth:`SineGen.forward`.
        """
        s = self.source(mel, generator, phase_init, noise)
        if cache_source is not None and cache_source.shape[2] != 0:
            s = s.clone()
            s[:, :, : cache_source.shape[2]] = cache_source
        return self.decode(mel, s), s

    inference = forward


def _strip_prefix(
    state_dict: Mapping[str, torch.Tensor], prefix: str
) -> dict[str, torch.Tensor]:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def load_strict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str
) -> None:
    """``load_state_dict(strict=True)`` with a readable error."""
    own = module.state_dict()
    # Legacy weight norm names are converted by torch's load hook; account for
    # them when checking names.
    names = set()
    for k in state_dict:
        if k.endswith(".weight_g"):
            k = k[: -len("weight_g")] + "parametrizations.weight.original0"
        elif k.endswith(".weight_v"):
            k = k[: -len("weight_v")] + "parametrizations.weight.original1"
        names.add(k)
    missing = sorted(set(own) - names)
    unexpected = sorted(names - set(own))
    bad_shape = sorted(
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    )
    if missing or unexpected or bad_shape:

        def _fmt(xs: list[str]) -> str:
            head = ", ".join(xs[:8])
            return head + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt(unexpected)}")
        if bad_shape:
            parts.append(f"shape mismatches: {_fmt(bad_shape)}")
        raise ValueError(
            f"{what}: state dict does not match the model "
            "(check the dims from the yaml); " + "; ".join(parts)
        )
    module.load_state_dict(state_dict, strict=True)


def load_hift(
    state_dict: Mapping[str, torch.Tensor],
    config: HiFTConfig | None = None,
    fold_weight_norm: bool = True,
) -> HiFTGenerator:
    """Build a :class:`HiFTGenerator` from an original ``hift.pt`` dict."""
    model = HiFTGenerator(config)
    load_strict(model, _strip_prefix(state_dict, "generator."), "hift.pt")
    model.eval()
    if fold_weight_norm:
        model.fold_weight_norm()
    return model


# ------------------------------------------------------- CosyVoice3 HiFT --
@dataclass
class CausalHiFTConfig(HiFTConfig):
    """``hift`` section of ``cosyvoice3.yaml`` (``CausalHiFTGenerator``)."""

    conv_pre_look_right: int = 4


class CausalConvRNNF0Predictor(nn.Module):
    """CosyVoice3's F0 predictor: like :class:`ConvRNNF0Predictor`, but the
    first conv (k=4) looks 3 frames ahead and the other four are causal."""

    def __init__(
        self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512
    ):
        super().__init__()
        layers: list[nn.Module] = [
            weight_norm(CausalConv1d(in_channels, cond_channels, 4, side="right")),
            nn.ELU(),
        ]
        for _ in range(4):
            layers += [
                weight_norm(CausalConv1d(cond_channels, cond_channels, 3)),
                nn.ELU(),
            ]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    @property
    def look_ahead(self) -> int:
        """Mel frames the first conv looks ahead (3)."""
        return self.condnet[0].causal_padding

    @staticmethod
    def init_shapes(
        num_class: int, in_channels: int, cond_channels: int
    ) -> list[tuple[int, ...]]:
        """Shapes of the tensors that the original's constructor draws
        (conv/linear default init: weight then bias, in layer order)."""
        shapes: list[tuple[int, ...]] = [
            (cond_channels, in_channels, 4),
            (cond_channels,),
        ]
        shapes += [(cond_channels, cond_channels, 3), (cond_channels,)] * 4
        return shapes + [(num_class, cond_channels), (num_class,)]

    def forward(self, mel: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        """mel [B, C, T] -> |f0| [B, T] (``finalize=False``: the last
        ``look_ahead`` frames are context only: [B, T - look_ahead])."""
        first = self.condnet[0]
        if finalize:
            h = first(mel)
        else:
            p = first.causal_padding
            h = first(mel[:, :, :-p], mel[:, :, -p:])
        for layer in list(self.condnet)[1:]:
            h = layer(h)
        return self.classifier(h.transpose(1, 2)).squeeze(-1).abs()


# The original draws the causal excitation's noise once, at construction:
# uniform [1, 300 s * 24000, harmonics + 1] (and a per-harmonic phase).
SINE_NOISE_SAMPLES = 300 * 24000
_SINE_NOISE_BLOCK = 30 * 24000


class CausalHiFTGenerator(HiFTGenerator):
    """CosyVoice3 causal HiFT: mel [B, 80, T] -> waveform [B, T * 480].

    Every conv is causal except two look-aheads: the F0 predictor's first
    conv (3 frames) and ``conv_pre`` (``conv_pre_look_right`` = 4 frames).
    With ``finalize=False`` (streaming) those 7 trailing frames are context
    only and one more frame is held back (its samples still depend on the
    iSTFT overlap), so the output covers ``T - 8`` frames. The F0 predictor
    runs in float64, as the original (its precision matters here).

    The excitation is deterministic: the original draws its initial phases
    and its (uniform) noise once, from the global RNG, when it is built. We
    reproduce those draws from ``noise_rng``, the RNG state right before the
    original builds the F0 predictor; ``None`` means as in a release load
    (``CosyVoice3``: the flow, built first, seeds 0; see
    ``cosyvoice3_flow.release_rng_after_flow``).
    """

    causal = True
    config: CausalHiFTConfig

    def __init__(
        self,
        config: CausalHiFTConfig | None = None,
        noise_rng: torch.Generator | None = None,
    ):
        cfg = config or CausalHiFTConfig()
        if not isinstance(cfg, CausalHiFTConfig):
            raise TypeError("CausalHiFTGenerator needs a CausalHiFTConfig")
        super().__init__(cfg)
        self.conv_pre_look_right = cfg.conv_pre_look_right
        self._init_fixed_noise(noise_rng)

    # causal layers (same parameter names and shapes as the original)
    def _make_conv_pre(self, cin: int, cout: int) -> nn.Module:
        k = self.config.conv_pre_look_right + 1
        return weight_norm(CausalConv1d(cin, cout, k, side="right"))

    def _make_up(self, cin: int, cout: int, kernel: int, rate: int) -> nn.Module:
        return weight_norm(CausalConv1dUpsample(cin, cout, kernel, rate))

    def _make_source_down(self, cin: int, cout: int, rate: int) -> nn.Module:
        if rate == 1:
            return CausalConv1d(cin, cout, 1)
        return CausalConv1dDownSample(cin, cout, rate)

    def _make_conv_post(self, cin: int, cout: int) -> nn.Module:
        return weight_norm(CausalConv1d(cin, cout, 7))

    def _make_f0_predictor(self, cfg: HiFTConfig) -> nn.Module:
        return CausalConvRNNF0Predictor(
            cfg.f0_num_class, cfg.f0_in_channels, cfg.f0_cond_channels
        )

    # ------------------------------------------------------------------
    @property
    def look_ahead(self) -> int:
        """Trailing mel frames used as context only when not finalizing."""
        return self.f0_predictor.look_ahead + self.conv_pre_look_right

    def _init_fixed_noise(self, rng: torch.Generator | None) -> None:
        if rng is None:
            from vllm.model_executor.models.cosyvoice3_flow import (
                CosyVoice3FlowConfig,
                release_rng_after_flow,
            )

            rng = release_rng_after_flow(CosyVoice3FlowConfig())
        cfg = self.config
        # The original builds the F0 predictor (its default init draws),
        # then the sine generator: phases, then the noise.
        for shape in CausalConvRNNF0Predictor.init_shapes(
            cfg.f0_num_class, cfg.f0_in_channels, cfg.f0_cond_channels
        ):
            torch.empty(shape).uniform_(generator=rng)
        dim = cfg.nb_harmonics + 1
        rand_ini = torch.rand(1, dim, generator=rng)
        rand_ini[:, 0] = 0
        self.register_buffer("rand_ini", rand_ini, persistent=False)
        self._noise_state = rng.get_state()
        self._noise_dim = dim
        self._noise_cpu: torch.Tensor | None = None
        self._noise_dev: torch.Tensor | None = None

    def fixed_noise(self, samples: int, device: torch.device) -> torch.Tensor:
        """The original's fixed excitation noise, [1, samples, harmonics+1].

        Drawn lazily (CPU, in growing blocks; a prefix of the draw equals a
        shorter draw) and cached, on CPU and on the last device used.
        """
        if samples > SINE_NOISE_SAMPLES:
            raise ValueError(
                f"HiFT: {samples} samples exceed the original's fixed noise "
                f"({SINE_NOISE_SAMPLES} samples = 300 s); split the input"
            )
        have = 0 if self._noise_cpu is None else self._noise_cpu.shape[1]
        if have < samples:
            n = min(SINE_NOISE_SAMPLES, max(samples, 2 * have, _SINE_NOISE_BLOCK))
            g = torch.Generator()
            g.set_state(self._noise_state)
            self._noise_cpu = torch.rand(1, n, self._noise_dim, generator=g)
            self._noise_dev = None
        assert self._noise_cpu is not None
        if device.type == "cpu":
            return self._noise_cpu[:, :samples]
        if self._noise_dev is None or self._noise_dev.device != device:
            self._noise_dev = self._noise_cpu.to(device)
        return self._noise_dev[:, :samples]

    def fold_weight_norm(self) -> None:
        # the F0 predictor runs in float64: fold its weights in float64
        self.f0_predictor.to(torch.float64)
        super().fold_weight_norm()

    def source(  # type: ignore[override]
        self, mel: torch.Tensor, finalize: bool = True
    ) -> torch.Tensor:
        """The NSF excitation [B, 1, T' * upsample] for mel [B, C, T]
        (T' = T, or T - 3 without ``finalize``)."""
        if self.f0_predictor.classifier.weight.dtype != torch.float64:
            self.f0_predictor.to(torch.float64)
        f0 = self.f0_predictor(mel.double(), finalize=finalize).to(mel.dtype)
        f0 = F.interpolate(
            f0[:, None], scale_factor=float(self.upsample_factor), mode="nearest"
        ).transpose(1, 2)
        b, n, _ = f0.shape
        noise = self.fixed_noise(n, mel.device).to(mel.dtype).expand(b, -1, -1)
        phase = self.rand_ini.to(mel.dtype).expand(b, -1)
        return self.m_source(f0, phase_init=phase, noise=noise).transpose(1, 2)

    def decode(  # type: ignore[override]
        self, mel: torch.Tensor, source: torch.Tensor, finalize: bool = True
    ) -> torch.Tensor:
        """mel [B, C, T], source [B, 1, T * upsample] -> waveform; without
        ``finalize`` the last ``conv_pre_look_right`` frames are context and
        one more frame is cut: [B, (T - look_right - 1) * upsample]."""
        s_stft = self._stft(source.squeeze(1))
        if finalize:
            x = self.conv_pre(mel)
        else:
            r = self.conv_pre_look_right
            x = self.conv_pre(mel[:, :, :-r], mel[:, :, -r:])
            s_stft = s_stft[:, :, : -math.prod(self.config.upsample_rates) * r]
        wav = self._decode_stages(x, s_stft)
        if not finalize:
            wav = wav[:, : -self.upsample_factor]
        return wav

    @torch.inference_mode()
    def forward(  # type: ignore[override]
        self, mel: torch.Tensor, finalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vocode ``mel`` [B, 80, T] -> (waveform, excitation).

        ``finalize=True``: T * 480 samples. ``finalize=False`` (a streaming
        chunk of the original): the last 7 frames are look-ahead context and
        the output has (T - 8) * 480 samples.
        """
        if mel.dim() != 3:
            raise ValueError(f"HiFT: mel must be [B, C, T], got {tuple(mel.shape)}")
        p = self.f0_predictor.look_ahead
        if not finalize and mel.shape[2] < self.look_ahead + 1:
            raise ValueError(
                f"HiFT: a non-final chunk needs at least {self.look_ahead + 1} "
                f"mel frames, got {mel.shape[2]}"
            )
        s = self.source(mel, finalize)
        wav = self.decode(mel if finalize else mel[:, :, :-p], s, finalize)
        return wav, s

    inference = forward


def load_causal_hift(
    state_dict: Mapping[str, torch.Tensor],
    config: CausalHiFTConfig | None = None,
    noise_rng: torch.Generator | None = None,
    fold_weight_norm: bool = True,
) -> CausalHiFTGenerator:
    """Build a :class:`CausalHiFTGenerator` from an original CosyVoice3
    ``hift.pt`` state dict (``noise_rng``: see the class)."""
    model = CausalHiFTGenerator(config, noise_rng)
    load_strict(model, _strip_prefix(state_dict, "generator."), "hift.pt")
    model.eval()
    if fold_weight_norm:
        model.fold_weight_norm()
    return model
