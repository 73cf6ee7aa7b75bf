# SPDX-License-Identifier: Apache-2.0
"""Parity of the CosyVoice2 audio stack (flow decoder + HiFT vocoder) with the
original implementation.

Oracle: PyPI ``cosyvoice-minicpmo==0.1.0`` (a copy of the original ``cosyvoice``
package at the CosyVoice2 stage). The reference modules are built with shrunk
dims and random weights, their state dicts saved exactly as the release files
(``flow.pt`` / ``hift.pt``), loaded by our code and compared in fp32.
"""

import logging
import sys
import types

import pytest
import torch


def _install_matcha_logger_shim() -> None:
    # ``matcha.models.components.flow_matching`` imports ``matcha.utils``,
    # whose __init__ pulls lightning/hydra/rich just for a logger factory. The
    # modules the oracle needs use nothing else from it, so provide only the
    # logger factory (no model code is replaced).
    if "matcha.utils.pylogger" in sys.modules:
        return
    import matcha  # noqa: F401  (the real package from cosyvoice-minicpmo)
    utils = types.ModuleType("matcha.utils")
    utils.__path__ = []  # type: ignore[attr-defined]
    pylogger = types.ModuleType("matcha.utils.pylogger")
    pylogger.get_pylogger = lambda name=__name__: logging.getLogger(name)
    sys.modules["matcha.utils"] = utils
    sys.modules["matcha.utils.pylogger"] = pylogger


_install_matcha_logger_shim()

from cosyvoice.hifigan.f0_predictor import (  # noqa: E402
    ConvRNNF0Predictor as RefF0Predictor)
from cosyvoice.hifigan.generator import (  # noqa: E402
    HiFTGenerator as RefHiFT)

from vllm.model_executor.models.cosyvoice_hift import (  # noqa: E402
    HiFTConfig, HiFTGenerator, load_hift)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ---------------------------------------------------------------- HiFT ----
HIFT_KW = dict(
    in_channels=80, base_channels=32, nb_harmonics=8, sampling_rate=24000,
    nsf_alpha=0.1, nsf_sigma=0.003, nsf_voiced_threshold=10,
    upsample_rates=[8, 5, 3], upsample_kernel_sizes=[16, 11, 7],
    istft_params={"n_fft": 16, "hop_len": 4},
    resblock_kernel_sizes=[3, 7, 11],
    resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    source_resblock_kernel_sizes=[7, 7, 11],
    source_resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    lrelu_slope=0.1, audio_limit=0.99)
F0_COND = 16


def _hift_config() -> HiFTConfig:
    d = dict(HIFT_KW)
    d["f0_predictor"] = {"num_class": 1, "in_channels": 80,
                         "cond_channels": F0_COND}
    return HiFTConfig.from_dict(d)


@pytest.fixture(scope="module")
def ref_hift() -> RefHiFT:
    torch.manual_seed(0)
    ref = RefHiFT(**HIFT_KW,
                  f0_predictor=RefF0Predictor(1, 80, F0_COND)).eval()
    with torch.no_grad():
        # The original init (N(0, 0.01) convs) gives f0 ~ 0, i.e. an all
        # unvoiced excitation; spread the weights and put f0 around a few
        # hundred Hz so that both voiced and unvoiced frames occur.
        for name, p in ref.named_parameters():
            if "alpha" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() > 1:
                p.normal_(0.0, 0.5 / max(1, p[0].numel())**0.5)
        ref.f0_predictor.classifier.weight.normal_(0.0, 150.0)
        ref.f0_predictor.classifier.bias.fill_(15.0)
    return ref


def _mel(b: int, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 80, t, generator=g)


@pytest.mark.parametrize("fold", [False, True])
def test_hift_parity(ref_hift, tmp_path, fold):
    path = tmp_path / "hift.pt"
    torch.save(ref_hift.state_dict(), path)
    ours = load_hift(torch.load(path, weights_only=True), _hift_config(),
                     fold_weight_norm=fold)
    mel = _mel(2, 12, 1)
    f0 = ref_hift.f0_predictor(mel)
    voiced = (f0 > 10).float().mean().item()
    assert 0.05 < voiced < 0.95, voiced  # both excitation branches exercised

    torch.manual_seed(1234)
    ref_wav, ref_src = ref_hift.inference(speech_feat=mel)
    wav, src = ours(mel, generator=torch.Generator().manual_seed(1234))
    assert wav.shape == ref_wav.shape == (2, 12 * 480)
    assert ours.upsample_factor == 480 and ours.sampling_rate == 24000
    assert rel_err(src, ref_src) < 1e-5
    assert rel_err(wav, ref_wav) < 1e-3
    assert wav.abs().max() > 1e-3  # not trivially silent

    # A different noise draw must change the output (the noise is live).
    wav2, _ = ours(mel, generator=torch.Generator().manual_seed(99))
    assert rel_err(wav2, ref_wav) > 1e-3


def test_hift_explicit_noise_and_cache_source(ref_hift):
    ours = load_hift(ref_hift.state_dict(), _hift_config())
    mel = _mel(1, 10, 2)
    # Explicit draws equal to the generator's draws give the same result.
    g = torch.Generator().manual_seed(7)
    phase = torch.rand(1, 9, generator=g)
    noise = torch.empty(1, 9, 10 * 480).transpose(1, 2).normal_(generator=g)
    a, _ = ours(mel, phase_init=phase, noise=noise)
    b, _ = ours(mel, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # cache_source overrides the start of the excitation, as the original.
    cache = torch.randn(1, 1, 3840, generator=g) * 0.1
    torch.manual_seed(5)
    ref_wav, ref_src = ref_hift.inference(speech_feat=mel, cache_source=cache)
    wav, src = ours(mel, cache_source=cache,
                    generator=torch.Generator().manual_seed(5))
    assert torch.equal(src[:, :, :3840], cache)
    assert rel_err(wav, ref_wav) < 1e-3


def test_hift_release_key_variants(ref_hift):
    sd = ref_hift.state_dict()
    mel = _mel(1, 6, 3)
    want, _ = load_hift(sd, _hift_config())(
        mel, generator=torch.Generator().manual_seed(0))
    # ``generator.`` prefix (as saved from the GAN wrapper)
    pref = {"generator." + k: v for k, v in sd.items()}
    # legacy torch.nn.utils.weight_norm names
    legacy = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"): v
        for k, v in sd.items()
    }
    assert any(k.endswith("weight_g") for k in legacy)
    for variant in (pref, legacy):
        got, _ = load_hift(variant, _hift_config())(
            mel, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(got, want, atol=1e-6)


def test_hift_load_errors(ref_hift):
    sd = dict(ref_hift.state_dict())
    sd.pop("conv_pre.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="missing keys: conv_pre.bias"):
        load_hift(sd, _hift_config())
    # wrong dims: the default (release) config against a shrunk checkpoint
    with pytest.raises(ValueError, match="shape mismatches"):
        load_hift(ref_hift.state_dict(), HiFTConfig())
