# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Reading SoulX-Podcast release directories as they are published.

A release directory (``Soul-AILab/SoulX-Podcast-1.7B`` or
``Soul-AILab/SoulX-Podcast-1.7B-dialect``) is a plain Hugging Face Qwen3
checkpoint with the CosyVoice2 audio stack beside it:

* ``config.json`` (``Qwen3ForCausalLM``), ``model.safetensors``, the HF
  tokenizer files (the SoulX special tokens are added tokens)
* ``flow.pt`` (``CausalMaskedDiffWithXvec`` state dict), ``hift.pt``
  (``HiFTGenerator``), ``campplus.onnx`` (CAM++ x-vector)
* optional ``soulxpodcast_config.json``: values merged over the original
  ``SoulXPodcastLLMConfig`` defaults (``speech_token_offset``, the speech
  ``eos_token_id``, ...)

``flow.pt`` + ``hift.pt`` next to a Qwen3 ``config.json`` is what tells such
a directory apart from a plain Qwen3 one; the architecture then becomes
``SoulXPodcastForCausalLM`` and the speech-specific values are added to the
config as ``soulx_*`` attributes. Nothing is converted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ARCH = "SoulXPodcastForCausalLM"
SOULX_CONFIG_NAME = "soulxpodcast_config.json"
FLOW_NAME = "flow.pt"
HIFT_NAME = "hift.pt"
BASE_ARCHS = ("Qwen3ForCausalLM",)

# soulxpodcast/config.py::SoulXPodcastLLMConfig (the fields read here).
LLM_DEFAULTS: dict[str, Any] = {
    "eos_token_id": 151675,  # speech eos
    "speech_token_offset": 152927,
    "vocab_size": 159488,
    "fp16_flow": False,
}
# soulxpodcast/config.py::SamplingParams (use_ras=True) and Config.
SAMPLING_DEFAULTS: dict[str, Any] = {
    "temperature": 0.6,
    "repetition_penalty": 1.25,
    "top_k": 100,
    "top_p": 0.9,
    "min_tokens": 8,
    "max_tokens": 3000,
    "win_size": 25,
    "tau_r": 0.2,
}
CONTEXT_DEFAULTS: dict[str, int] = {
    "max_turn_size": 10,
    "turn_tokens_threshold": 6192,
    "prompt_context": 2,
    "history_context": 2,
    "history_text_context": 2,
}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_soulx_podcast_release_dir(path: str | Path) -> bool:
    """A SoulX-Podcast release: a Qwen3 ``config.json`` with ``flow.pt`` and
    ``hift.pt`` beside it (a plain Qwen3 directory has neither)."""
    path = Path(path)
    if not (
        path.is_dir()
        and (path / "config.json").is_file()
        and (path / FLOW_NAME).is_file()
        and (path / HIFT_NAME).is_file()
    ):
        return False
    archs = _read_json(path / "config.json").get("architectures") or []
    return list(archs) in ([a] for a in BASE_ARCHS + (ARCH,))


def soulx_settings(model_dir: str | Path) -> dict[str, Any]:
    """The original's LLM config values (defaults merged with
    ``soulxpodcast_config.json``, as ``from_initial_and_json`` does)."""
    merged = dict(LLM_DEFAULTS)
    path = Path(model_dir) / SOULX_CONFIG_NAME
    if path.is_file():
        merged.update(_read_json(path))
    return merged


def apply_soulx_podcast_config(config: Any, model_dir: str | Path) -> Any:
    """Turn the release's Qwen3 config into the ``SoulXPodcastForCausalLM``
    one (in place): architecture, speech token range, speech eos, the
    original's sampling and context-reset defaults."""
    s = soulx_settings(model_dir)
    vocab = int(config.vocab_size)
    offset = int(s["speech_token_offset"])
    eos = int(s["eos_token_id"])
    if not 0 < offset < vocab:
        raise ValueError(
            f"{model_dir}: speech_token_offset {offset} outside the vocabulary "
            f"({vocab} ids)"
        )
    if not 0 <= eos < offset:
        raise ValueError(
            f"{model_dir}: speech eos {eos} must be a text-range id (< {offset})"
        )
    config.architectures = [ARCH]
    config.soulx_speech_token_offset = offset
    config.soulx_speech_token_size = vocab - offset
    config.soulx_speech_eos_id = eos
    config.soulx_sampling = dict(SAMPLING_DEFAULTS)
    config.soulx_context = dict(CONTEXT_DEFAULTS)
    config.soulx_sample_rate = 24000
    config.soulx_token_frame_rate = 25.0
    return config
