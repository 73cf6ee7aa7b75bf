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
  F0 are not degenerate: both voiced and unvoiced frames occur).

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
                m.weight = torch.randn(w.shape, generator=g) * (0.5 / fan_in**0.5)
        for name, p in hift.named_parameters():
            if "alpha" in name:
                p.uniform_(0.5, 1.5, generator=g)
            elif "parametrizations" not in name and p.dim() > 1:
                p.normal_(0.0, 0.5 / max(1, p[0].numel()) ** 0.5, generator=g)
        _spread_f0(hift.f0_predictor, g)
    return flow.eval(), hift.eval()


def _spread_f0(f0_predictor: Any, g: Any, std_hz: float = 40.0) -> None:
    """Set the F0 head so that, on mel-like input (N(0, 1)), the signed F0
    is centred on 0 Hz with ``std_hz`` spread: about a quarter of the
    frames fall under the 10 Hz voicing threshold."""
    import torch

    probe = torch.randn(1, f0_predictor.condnet[0].in_channels, 200, generator=g)
    head = f0_predictor.classifier
    head.weight.normal_(0.0, 1.0, generator=g)
    h = probe
    for layer in f0_predictor.condnet:
        h = layer(h)
    raw = h.transpose(1, 2) @ head.weight[0]
    scale = std_hz / raw.std().clamp_min(1e-6)
    head.weight.mul_(scale)
    head.bias.fill_(float(-raw.mean() * scale))


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
