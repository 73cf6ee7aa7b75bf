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


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha, with a per-channel linear-scale alpha."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha[None, :, None]
        return x + torch.sin(x * a).pow(2) * (1.0 / (a + 1e-9))


class ResBlock(nn.Module):
    """Dilated residual block with Snake activations (HiFi-GAN/BigVGAN)."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            _wn_conv1d(
                channels,
                channels,
                kernel_size,
                1,
                dilation=d,
                padding=(kernel_size * d - d) // 2,
            )
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            _wn_conv1d(
                channels,
                channels,
                kernel_size,
                1,
                dilation=1,
                padding=(kernel_size - 1) // 2,
            )
            for _ in dilations
        )
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
    interpolation by 1/upsample), integrated there, and interpolated back up.
    """

    def __init__(
        self,
        sampling_rate: int,
        upsample_scale: int,
        harmonic_num: int,
        sine_amp: float,
        noise_std: float,
        voiced_threshold: float,
    ):
        super().__init__()
        self.sampling_rate = sampling_rate
        self.upsample_scale = upsample_scale
        self.dim = harmonic_num + 1
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.voiced_threshold = voiced_threshold

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
            mode="linear",
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
    ):
        super().__init__()
        self.l_sin_gen = SineGen(
            sampling_rate,
            upsample_scale,
            harmonic_num,
            sine_amp,
            add_noise_std,
            voiced_threshold,
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
        )
        self.conv_pre = _wn_conv1d(cfg.in_channels, base, 7, 1, padding=3)
        self.ups = nn.ModuleList()
        for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            self.ups.append(
                weight_norm(
                    nn.ConvTranspose1d(
                        base // 2**i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2
                    )
                )
            )

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
            if u == 1:
                self.source_downs.append(nn.Conv1d(n_stft, ch, 1, 1))
            else:
                self.source_downs.append(
                    nn.Conv1d(n_stft, ch, u * 2, u, padding=u // 2)
                )
            self.source_resblocks.append(ResBlock(ch, k, d))

        self.resblocks = nn.ModuleList()
        for i in range(self.num_upsamples):
            ch = base // 2 ** (i + 1)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(ResBlock(ch, k, d))
        self.conv_post = _wn_conv1d(ch, n_stft, 7, 1, padding=3)
        self.f0_predictor = ConvRNNF0Predictor(
            cfg.f0_num_class, cfg.f0_in_channels, cfg.f0_cond_channels
        )
        self.register_buffer(
            "stft_window",
            torch.hann_window(self.n_fft, periodic=True, dtype=torch.float64).float(),
            persistent=False,
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
        x = self.conv_pre(mel)
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
