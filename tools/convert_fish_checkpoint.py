#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Convert a Fish Speech dual-AR LM release directory (fish-speech-1.5,
openaudio-s1-mini: ``model.pth``) to a safetensors / Hugging Face style layout:

    python tools/convert_fish_checkpoint.py SRC_DIR OUT_DIR [--dtype bf16|fp16|fp32]

OUT_DIR gets ``model.safetensors`` (sharded with an index above
``--max-shard-gb``) holding the original tensor names (after the original
loader's own fix-ups: ``state_dict`` unwrapped, ``model.`` prefix stripped,
``audio_*`` tensors dropped, separate ``wq/wk/wv`` fused into ``wqkv``), a
``config.json`` with ``architectures: ["FishSpeechForCausalLM"]``, the
resolved ``fish_version`` (1.5's forced ``head_dim`` survives the rewrite)
and the positional special ids (``semantic_begin_id``, ``semantic_end_id``,
``im_end_id``), plus the tokenizer files and any other files (e.g. the codec)
copied as they are. vLLM loads both layouts with the same model class.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def read_release_state_dict(src: Path) -> OrderedDict:
    path = src / "model.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a 1.5 / S1 release directory?)")
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    keys = list(sd)
    if keys and keys[0].startswith("model."):
        sd = OrderedDict((k.replace("model.", ""), v) for k, v in sd.items())
    sd = OrderedDict((k, v) for k, v in sd.items() if "audio_" not in k)
    for k in [k for k in sd if k.endswith(".attention.wq.weight")]:
        p = k[: -len("wq.weight")]
        sd[p + "wqkv.weight"] = torch.cat(
            [sd.pop(p + "wq.weight"), sd.pop(p + "wk.weight"), sd.pop(p + "wv.weight")]
        )
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: non-tensor entries {bad[:5]}")
    return sd


def convert(src: Path, out: Path, dtype: torch.dtype | None, max_shard_gb: float) -> None:
    from safetensors.torch import save_file

    from vllm.tokenizers.fish_speech import fish_special_ids, fish_version_of_dir
    from vllm.transformers_utils.configs.fish_speech import resolve_dual_ar_args

    with open(src / "config.json", encoding="utf-8") as f:
        raw = json.load(f)
    if raw.get("model_type") != "dual_ar":
        raise ValueError(
            f"{src}/config.json: model_type {raw.get('model_type')!r}; only "
            "dual_ar (1.5 / S1) release directories need converting"
        )
    version = fish_version_of_dir(src)
    sb, se, im_end = fish_special_ids(src)
    sd = read_release_state_dict(src)
    if dtype is not None:
        sd = OrderedDict(
            (k, v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()
        )
    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():  # tokenizer, codec, README, ...
        if item.name in ("model.pth", "config.json"):
            continue
        dst = out / item.name
        if item.is_dir():
            shutil.copytree(item, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(item, dst)

    limit = int(max_shard_gb * (1 << 30))
    shards: list[OrderedDict] = [OrderedDict()]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > limit:
            shards.append(OrderedDict())
            size = 0
        shards[-1][k] = v.contiguous()
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        with open(out / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)

    cfg = dict(raw)
    resolved = resolve_dual_ar_args(raw, version)
    cfg.update(resolved)  # 1.5's forced head_dim / fast fallbacks made explicit
    cfg.update(
        architectures=["FishSpeechForCausalLM"],
        fish_version=version,
        semantic_begin_id=sb,
        semantic_end_id=se,
        im_end_id=im_end,
    )
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    with open(out / "config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                    help="cast floating tensors (default: keep)")
    ap.add_argument("--max-shard-gb", type=float, default=4.0)
    a = ap.parse_args()
    convert(a.src, a.out, _DTYPES.get(a.dtype), a.max_shard_gb)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
