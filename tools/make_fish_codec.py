#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Write a tiny random Fish modded-DAC codec (OpenAudio S1 ``codec.pth``).

Built with the original classes (``fish_speech==0.1.0`` on top of
``descript-audio-codec``) at tiny dims and saved with ``torch.save`` of the
state dict, exactly as the release file is keyed (including S1's persistent
``causal_mask`` / ``freqs_cis`` buffers).

    python tools/make_fish_codec.py OUT/codec.pth [--seed N]
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

QUANT_WINDOW = 5  # small, so that the window-limited mask matters
WN_GAIN = 0.7  # keeps the tiny decoder out of tanh saturation


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights that make every part of the network matter (the
    original init leaves LayerScale at 1e-2 / 1e-6 and biases at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.rand(p.shape, generator=g)
            if name.endswith("alpha"):
                p.copy_(0.5 + r)
            elif name.endswith("gamma"):
                p.copy_(0.2 + 0.3 * r)
            elif name.endswith((".original0", ".weight_g")):
                p.copy_(WN_GAIN * (0.5 + r))  # weight-norm gain
            elif name.endswith("bias"):
                p.copy_(0.1 * (r - 0.5))
            elif name.endswith("norm.weight") or ".norm." in name:
                p.copy_(0.8 + 0.4 * r)
            elif name.endswith("codebook.weight"):
                pass
            else:
                # linear / conv weights: scale so activations stay O(1)
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_((r - 0.5) * 2 * (3.0 / fan_in) ** 0.5)


@functools.cache
def reference_dac(seed: int = 0):
    from fish_speech.models.dac.modded_dac import (
        DAC,
        ModelArgs,
        WindowLimitedTransformer,
    )
    from fish_speech.models.dac.rvq import DownsampleResidualVectorQuantize

    torch.manual_seed(seed)
    latent = 128

    def quant_transformer():
        return WindowLimitedTransformer(
            causal=True,
            window_size=QUANT_WINDOW,
            input_dim=latent,
            config=ModelArgs(
                block_size=256,
                n_layer=2,
                n_head=2,
                dim=latent,
                intermediate_size=3 * latent,
                n_local_heads=-1,
                head_dim=64,
                rope_base=10000,
                norm_eps=1e-5,
                dropout_rate=0.1,
                attn_dropout_rate=0.1,
                channels_first=True,
            ),
        )

    quantizer = DownsampleResidualVectorQuantize(
        input_dim=latent,
        n_codebooks=9,
        codebook_size=1024,
        codebook_dim=8,
        quantizer_dropout=0.5,
        downsample_factor=[2, 2],
        pre_module=quant_transformer(),
        post_module=quant_transformer(),
        semantic_codebook_size=4096,
    )
    general = functools.partial(
        ModelArgs,
        block_size=1024,
        n_local_heads=-1,
        head_dim=64,
        rope_base=10000,
        norm_eps=1e-5,
        dropout_rate=0.1,
        attn_dropout_rate=0.1,
        channels_first=True,
    )
    dac = DAC(
        encoder_dim=8,
        encoder_rates=[2, 4, 8, 8],
        decoder_dim=64,
        decoder_rates=[8, 8, 4, 2],
        quantizer=quantizer,
        sample_rate=44100,
        causal=True,
        encoder_transformer_layers=[0, 0, 0, 2],
        decoder_transformer_layers=[2, 0, 0, 0],
        transformer_general_config=general,
    )
    randomize(dac, seed)
    return dac.eval()



def make_s1_codec(path: str | Path, seed: int = 0) -> Path:
    """Save ``reference_dac(seed)``'s state dict as a release ``codec.pth``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference_dac(seed).state_dict(), path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(make_s1_codec(a.out, a.seed))


if __name__ == "__main__":
    main()
