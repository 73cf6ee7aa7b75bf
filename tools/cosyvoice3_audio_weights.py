#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Random-weight CosyVoice3 audio side (flow + HiFT) in the release format.

* ``CV3_AUDIO_YAML[size]`` (size ``"tiny"`` | ``"real"``): the ``flow`` and
  ``hift`` sections of ``cosyvoice3.yaml`` (``CausalMaskedDiffWithDiT`` with
  the ``DiT`` estimator, ``CausalHiFTGenerator``), in the layout of
  ``examples/libritts/cosyvoice3/conf/cosyvoice3.yaml``: the template
  ``AUDIO_YAML`` of ``make_cosyvoice3_checkpoint.py`` with its ``TINY`` /
  ``REAL`` dims; "real" has the release dims, "tiny" shrinks the DiT, the
  look-ahead layer, the HiFT and the vocabulary (300, the tiny LM's speech
  tokens). The sections refer to the yaml's fixed params (``sample_rate``,
  ``spk_embed_dim``, ``token_frame_rate``, ``token_mel_ratio``,
  ``chunk_size``, ``num_decoding_left_chunks``); ``CV3_AUDIO_HEADER`` defines
  them for a standalone file (``cv3_audio_yaml``).
* ``write_cv3_flow_hift(out_dir, size, seed)`` writes ``flow.pt`` and
  ``hift.pt``: plain state dicts with the original key names and shapes
  (random init by our own modules, spread so that the tiny model's mel and
  F0 are not degenerate: both voiced and unvoiced frames occur). The few
  computed values (the weight-norm magnitudes, the F0 head's scale) are
  computed in float64, so that the files do not depend on the CPU's
  float32 kernels.
* ``state_digest(state)`` / ``digest_mismatches(state, digest)``: a small
  record of a state dict (per tensor: sums, norm, a random projection,
  sampled values) and a tolerant comparison with it; the CosyVoice3 audio
  fixture records the weights it was made from this way.

    python tools/cosyvoice3_audio_weights.py OUT [--size tiny|real] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# The template and the dims are the release maker's (tools/ is on sys.path
# wherever this module is imported or run).
from make_cosyvoice3_checkpoint import AUDIO_YAML, REAL, TINY

CV3_AUDIO_HEADER = """\
sample_rate: 24000
spk_embed_dim: 192
token_frame_rate: 25
token_mel_ratio: 2
chunk_size: 25
num_decoding_left_chunks: -1

"""

CV3_AUDIO_YAML: dict[str, str] = {
    "tiny": AUDIO_YAML.format(**TINY),
    "real": AUDIO_YAML.format(**REAL),
}


def cv3_audio_yaml(size: str = "tiny") -> str:
    """A standalone yaml: the fixed params + the flow and hift sections."""
    return CV3_AUDIO_HEADER + CV3_AUDIO_YAML[_check_size(size)]


def _check_size(size: str) -> str:
    if size not in CV3_AUDIO_YAML:
        raise ValueError(f"size must be one of {sorted(CV3_AUDIO_YAML)}, got {size!r}")
    return size


def _configs(size: str) -> tuple[Any, Any]:
    """Our flow / HiFT configs parsed from the yaml text (as a release
    load parses them)."""
    import yaml

    from vllm.model_executor.models.cosyvoice3_flow import CosyVoice3FlowConfig
    from vllm.model_executor.models.cosyvoice_hift import CausalHiFTConfig
    from vllm.model_executor.models.cosyvoice_token2wav import (
        _resolve,
        _TagIgnoringLoader,
    )

    raw = yaml.load(cv3_audio_yaml(size), Loader=_TagIgnoringLoader)  # noqa: S506
    flow = CosyVoice3FlowConfig.from_dict(_resolve(raw["flow"], raw))
    hift = CausalHiFTConfig.from_dict(_resolve(raw["hift"], raw))
    return flow, hift


def build_cv3_audio_modules(size: str = "tiny", seed: int = 0) -> tuple[Any, Any]:
    """(flow, hift) modules of ``size`` with seeded random weights."""
    import torch
    from torch.nn.utils import parametrize

    from vllm.model_executor.models.cosyvoice3_flow import CausalMaskedDiffWithDiT
    from vllm.model_executor.models.cosyvoice_hift import CausalHiFTGenerator

    flow_cfg, hift_cfg = _configs(_check_size(size))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flow = CausalMaskedDiffWithDiT(flow_cfg)
        hift = CausalHiFTGenerator(hift_cfg, noise_rng=torch.Generator())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # Flow: the default init, with the embedding scaled down to the range
        # of a mel and nonzero biases in the DiT's modulation.
        flow.input_embedding.weight.normal_(0.0, 0.5, generator=g)
        for name, p in flow.named_parameters():
            if name.endswith("linear.bias"):
                p.normal_(0.0, 0.2, generator=g)
        # HiFT: spread the weights (the default init makes the excitation
        # all unvoiced) and put F0 around a few hundred Hz.
        for m in hift.modules():
            if parametrize.is_parametrized(m, "weight"):
                w = m.weight
                fan_in = max(1, w[0].numel())
                _set_weight_norm(
                    m, torch.randn(w.shape, generator=g) * (0.5 / fan_in**0.5)
                )
        for name, p in hift.named_parameters():
            if "alpha" in name:
                p.uniform_(0.5, 1.5, generator=g)
            elif "parametrizations" not in name and p.dim() > 1:
                p.normal_(0.0, 0.5 / max(1, p[0].numel()) ** 0.5, generator=g)
        _spread_f0(hift.f0_predictor, g)
    return flow.eval(), hift.eval()


def _set_weight_norm(m: Any, w: Any) -> None:
    """``m.weight = w`` for a ``weight_norm`` parametrization (g = the norm
    of ``w`` over all dims but ``dim``, v = ``w``), with the norm taken in
    float64: the float32 reduction's rounding depends on the CPU's vector
    width, the float64 one rounded to float32 does not."""
    import torch

    wn = m.parametrizations.weight
    dim = wn[0].dim % w.dim()
    w64 = w.double().movedim(dim, 0)
    norm = w64.reshape(w64.shape[0], -1).norm(dim=1)
    shape = [1] * w.dim()
    shape[dim] = -1
    wn.original0.copy_(norm.reshape(shape).to(torch.float32))
    wn.original1.copy_(w)


def _spread_f0(f0_predictor: Any, g: Any, std_hz: float = 40.0) -> None:
    """Set the F0 head so that, on mel-like input (N(0, 1)), the signed F0
    is centred on 0 Hz with ``std_hz`` spread: about a quarter of the
    frames fall under the 10 Hz voicing threshold.

    The probe pass (convs, the head's dot product, mean / std) runs in
    float64 on a copy of the conditioning net and only the final weight and
    bias are rounded to float32: in float32 the BLAS / oneDNN kernels that
    the CPU picks (AVX2 vs AVX-512, MKL's code path) change the last bit of
    the result, hence of the written ``hift.pt``."""
    import copy

    import torch

    probe = torch.randn(1, f0_predictor.condnet[0].in_channels, 200, generator=g)
    head = f0_predictor.classifier
    head.weight.normal_(0.0, 1.0, generator=g)
    h = probe.double()
    for layer in copy.deepcopy(f0_predictor.condnet).double():
        h = layer(h)
    w = head.weight[0].double()
    raw = h[0].transpose(0, 1) @ w
    scale = std_hz / raw.std().clamp_min(1e-6)
    head.weight.copy_((w * scale).to(torch.float32)[None])
    head.bias.fill_(float((-raw.mean() * scale).to(torch.float32)))


def write_cv3_flow_hift(
    out_dir: str | Path, size: str = "tiny", seed: int = 0
) -> tuple[Path, Path]:
    """Write ``flow.pt`` and ``hift.pt`` (fp32 state dicts, original key
    names) into ``out_dir``; returns their paths."""
    import torch

    flow, hift = build_cv3_audio_modules(size, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, module in (("flow.pt", flow), ("hift.pt", hift)):
        state = {
            k: v.detach().to(torch.float32).contiguous().clone()
            for k, v in module.state_dict().items()
        }
        torch.save(state, out / name)
        paths.append(out / name)
    return paths[0], paths[1]


# Columns of ``state_digest``'s stats, then ``DIGEST_SAMPLES`` values at
# evenly spaced flat indices.
DIGEST_STATS = ("sum", "abs_sum", "l2", "max_abs", "projection")
DIGEST_SAMPLES = 8


def state_digest(state: dict[str, Any]) -> dict[str, Any]:
    """A small record of a state dict that can be compared with a tolerance
    (``digest_mismatches``), unlike a sha256 of the file: the key names,
    shapes and dtypes, and per tensor (in float64) the sum, the sum of
    absolute values, the L2 norm, the max absolute value, the dot product
    with a fixed random vector in [-1, 1] (sensitive to any element, its
    sign and its place) and ``DIGEST_SAMPLES`` sampled values."""
    import torch

    names = sorted(state)
    rows = []
    for k in names:
        x = state[k].detach().reshape(-1).to(torch.float64)
        n = x.numel()
        if n == 0:
            rows.append(torch.zeros(len(DIGEST_STATS) + DIGEST_SAMPLES))
            continue
        gen = torch.Generator().manual_seed(0)
        r = torch.rand(n, generator=gen, dtype=torch.float64)
        idx = torch.linspace(0, n - 1, DIGEST_SAMPLES, dtype=torch.float64).round()
        a = x.abs()
        stats = [x.sum(), a.sum(), x.norm(), a.max(), (x * (2 * r - 1)).sum()]
        rows.append(torch.cat([torch.stack(stats), x[idx.long()]]))
    return {
        "names": names,
        "shapes": [list(state[k].shape) for k in names],
        "dtypes": [str(state[k].dtype) for k in names],
        "stats": torch.stack(rows).to(torch.float64),
    }


def digest_mismatches(
    state: dict[str, Any], want: dict[str, Any], rtol: float = 1e-5
) -> list[str]:
    """How ``state`` differs from the ``state_digest`` ``want`` (empty: the
    same weights up to float rounding). Key names, shapes and dtypes must be
    equal; each stat within ``rtol`` of the reference tensor's scale (its
    sum of absolute values for the sums and the projection, its max
    absolute value for the norm, the max and the samples)."""
    import torch

    got = state_digest(state)
    if got["names"] != want["names"]:
        missing = sorted(set(want["names"]) - set(got["names"]))
        extra = sorted(set(got["names"]) - set(want["names"]))
        return [f"keys differ: missing {missing[:5]}, unexpected {extra[:5]}"]
    out = []
    cols = list(DIGEST_STATS) + [f"sample{i}" for i in range(DIGEST_SAMPLES)]
    tiny = torch.finfo(torch.float32).tiny
    for i, k in enumerate(want["names"]):
        layout = [
            f"{k}: {what[:-1]} {got[what][i]} != {want[what][i]}"
            for what in ("shapes", "dtypes")
            if got[what][i] != want[what][i]
        ]
        if layout:
            out += layout
            continue
        g, w = got["stats"][i], want["stats"][i]
        abs_sum, max_abs = w[1].item(), w[3].item()
        for j, col in enumerate(cols):
            scale = abs_sum if col in ("sum", "abs_sum", "projection") else max_abs
            err = abs(g[j].item() - w[j].item())
            if err > rtol * max(scale, tiny):
                out.append(
                    f"{k}: {col} {g[j].item():.9g} != {w[j].item():.9g} "
                    f"(|diff| {err:.3g} > {rtol:g} * {scale:.3g})"
                )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--size", default="tiny", choices=sorted(CV3_AUDIO_YAML))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for p in write_cv3_flow_hift(args.out, args.size, args.seed):
        print(p)


if __name__ == "__main__":
    main()
