# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Reading CosyVoice2 / CosyVoice3 release directories as they are published.

A release directory (e.g. ``FunAudioLLM/CosyVoice2-0.5B`` or
``FunAudioLLM/Fun-CosyVoice3-0.5B-2512``) holds no top-level ``config.json``:

* ``cosyvoice2.yaml`` or ``cosyvoice3.yaml`` (hyperpyyaml: ``llm`` / ``flow``
  / ``hift`` sections; the file name picks the generation, as the original
  ``AutoModel`` does)
* ``llm.pt`` (plain ``state_dict()`` of ``cosyvoice.llm.llm.Qwen2LM`` or
  ``CosyVoice3LM``)
* ``flow.pt``, ``hift.pt`` (audio side, read by ``cosyvoice_token2wav``)
* ``CosyVoice-BlankEN/`` (the Qwen2 config, weights and tokenizer)
* ``campplus.onnx``, ``speech_tokenizer_v2.onnx`` (``_v3`` for CosyVoice3),
  optional ``spk2info.pt``

The config is the backbone's ``Qwen2Config`` with a *unified* vocabulary: text
ids ``[0, V_text)`` (rows of the Qwen2 ``embed_tokens``), then, for
CosyVoice2, the two rows of ``llm_embedding`` (sos/eos, task_id) and the
``speech_token_size + 3`` rows of ``speech_embedding``; for CosyVoice3 (no
``llm_embedding``: its specials are speech rows) the ``speech_token_size +
200`` rows of ``speech_embedding``. The speech-specific values are added as
``cosyvoice_*`` attributes.
"""

import os
import re
from pathlib import Path
from typing import Any

import yaml
from transformers import PretrainedConfig

from vllm.transformers_utils.config_parser_base import ConfigParserBase

ARCH = "CosyVoice2ForCausalLM"
YAML_NAME = "cosyvoice2.yaml"
LLM_NAME = "llm.pt"
QWEN_DIR_NAME = "CosyVoice-BlankEN"
# Release yaml -> (architecture, LM class the yaml must build, rows of
# speech_embedding after the speech tokens, rows of llm_embedding).
# The original AutoModel looks for cosyvoice2.yaml before cosyvoice3.yaml.
RELEASES: dict[str, tuple[str, str, int, int]] = {
    "cosyvoice2.yaml": (ARCH, "Qwen2LM", 3, 2),
    "cosyvoice3.yaml": ("CosyVoice3ForCausalLM", "CosyVoice3LM", 200, 0),
}

# Qwen2LM.inference defaults (cosyvoice/llm/llm.py); not in the yaml.
MIN_TOKEN_TEXT_RATIO = 2.0
MAX_TOKEN_TEXT_RATIO = 20.0
# ras_sampling defaults (cosyvoice/utils/common.py)
RAS_DEFAULTS = {"top_p": 0.8, "top_k": 25, "win_size": 10, "tau_r": 0.1}


def release_yaml(path: str | Path) -> Path | None:
    """The release yaml of a CosyVoice2/3 directory (None if neither)."""
    path = Path(path)
    for name in RELEASES:
        if (path / name).is_file():
            return path / name
    return None


def is_cosyvoice2_release_dir(path: str | Path) -> bool:
    """A CosyVoice2 or CosyVoice3 release directory."""
    path = Path(path)
    return (
        path.is_dir()
        and release_yaml(path) is not None
        and (path / LLM_NAME).is_file()
        and (path / QWEN_DIR_NAME).is_dir()
    )


def _check_llm_class(yaml_path: Path, expected: str) -> None:
    """The yaml's ``llm: !new:...`` class must be the generation's LM (the
    original asserts the model type the same way)."""
    text = yaml_path.read_text(encoding="utf-8")
    m = re.search(r"^llm:\s*!new:([\w.]+)", text, flags=re.MULTILINE)
    if m is not None and m.group(1).rsplit(".", 1)[-1] != expected:
        raise ValueError(
            f"{yaml_path}: llm is {m.group(1)}, but {yaml_path.name} releases "
            f"use cosyvoice.llm.llm.{expected}"
        )


def read_llm_section(yaml_path: str | Path) -> dict[str, Any]:
    """The ``llm`` section of the release yaml (references resolved, tags
    read as plain data; nothing is executed) plus ``sample_rate`` and
    ``token_frame_rate``."""
    from vllm.model_executor.models.cosyvoice_token2wav import (
        _resolve,
        _TagIgnoringLoader,
    )

    with open(yaml_path, encoding="utf-8") as f:
        raw = yaml.load(f, Loader=_TagIgnoringLoader)  # noqa: S506
    if not isinstance(raw, dict):
        raise ValueError(f"{yaml_path}: not a mapping")
    llm = raw.get("llm") or {}
    out = {
        "llm": _resolve(llm, raw) if isinstance(llm, dict) else {},
        "sample_rate": _resolve(raw.get("sample_rate", 24000), raw),
        "token_frame_rate": _resolve(raw.get("token_frame_rate", 25), raw),
    }
    return out


def cosyvoice2_config_dict(model: str | Path) -> dict[str, Any]:
    from transformers import AutoConfig

    model = Path(model)
    yaml_path = release_yaml(model)
    if yaml_path is None:
        raise ValueError(
            f"{model}: no {' or '.join(RELEASES)} (CosyVoice release directory)"
        )
    arch, llm_class, extra_speech_rows, llm_embedding_rows = RELEASES[yaml_path.name]
    _check_llm_class(yaml_path, llm_class)
    conf = read_llm_section(yaml_path)
    llm = conf["llm"]
    qwen = AutoConfig.from_pretrained(os.fspath(model / QWEN_DIR_NAME))
    text_vocab = int(qwen.vocab_size)
    speech_token_size = int(llm.get("speech_token_size", 6561))
    hidden = int(llm.get("llm_input_size", qwen.hidden_size))
    if hidden != qwen.hidden_size or int(llm.get("llm_output_size", hidden)) != int(
        qwen.hidden_size
    ):
        raise ValueError(
            f"{model}: llm_input_size/llm_output_size do not match the hidden "
            f"size of {QWEN_DIR_NAME} ({qwen.hidden_size})"
        )
    sampling = dict(RAS_DEFAULTS)
    if isinstance(llm.get("sampling"), dict):
        sampling.update({k: v for k, v in llm["sampling"].items() if k in RAS_DEFAULTS})
    config_dict = qwen.to_dict()
    config_dict.update(
        architectures=[arch],
        vocab_size=text_vocab
        + llm_embedding_rows
        + speech_token_size
        + extra_speech_rows,
        tie_word_embeddings=False,
        cosyvoice_text_vocab_size=text_vocab,
        cosyvoice_speech_token_size=speech_token_size,
        cosyvoice_sampling=sampling,
        cosyvoice_sample_rate=int(conf["sample_rate"]),
        cosyvoice_token_frame_rate=float(conf["token_frame_rate"]),
        cosyvoice_min_token_text_ratio=MIN_TOKEN_TEXT_RATIO,
        cosyvoice_max_token_text_ratio=MAX_TOKEN_TEXT_RATIO,
    )
    return config_dict


class CosyVoice2ConfigParser(ConfigParserBase):
    """``config_format="cosyvoice2"`` (CosyVoice2 and CosyVoice3 release
    directories): the backbone's Qwen2 config with the unified text + special
    + speech vocabulary."""

    def parse(
        self,
        model: str | Path,
        trust_remote_code: bool,
        revision: str | None = None,
        code_revision: str | None = None,
        **kwargs,
    ) -> tuple[dict, PretrainedConfig]:
        from transformers import Qwen2Config

        if not is_cosyvoice2_release_dir(model):
            raise ValueError(
                f"{model} is not a CosyVoice2/3 release directory "
                f"({' or '.join(RELEASES)}, {LLM_NAME} and {QWEN_DIR_NAME}/ "
                "expected)"
            )
        config_dict = cosyvoice2_config_dict(model)
        config = Qwen2Config(**config_dict)
        hf_overrides = kwargs.get("hf_overrides")
        if isinstance(hf_overrides, dict):
            config.update(hf_overrides)
        return config_dict, config
