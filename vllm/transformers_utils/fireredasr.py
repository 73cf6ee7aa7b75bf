# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Reading FireRedASR (v1) release directories as they are published.

A release directory holds no ``config.json``:

* ``FireRedASR-AED-L/``: ``model.pth.tar``, ``cmvn.ark``, ``dict.txt``,
  ``train_bpe1000.model``
* ``FireRedASR-LLM-L/``: ``model.pth.tar``, ``asr_encoder.pth.tar``,
  ``cmvn.ark``, ``Qwen2-7B-Instruct/``

``*.pth.tar`` files are ``torch.save({"args": argparse.Namespace, "model_state_dict":
...})`` packages. They are read with ``weights_only=True`` and only
``argparse.Namespace`` allow-listed.
"""

import argparse
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig

from vllm.transformers_utils.config_parser_base import ConfigParserBase

AED_ARCH = "FireRedASRAEDForConditionalGeneration"
LLM_ARCH = "FireRedASRLLMForConditionalGeneration"

PACKAGE_NAME = "model.pth.tar"
CMVN_NAME = "cmvn.ark"
ENCODER_PACKAGE_NAME = "asr_encoder.pth.tar"
LLM_DIR_NAME = "Qwen2-7B-Instruct"
DICT_NAME = "dict.txt"
SPM_NAME = "train_bpe1000.model"


def is_fireredasr_release_dir(path: str | Path) -> bool:
    path = Path(path)
    return (
        path.is_dir()
        and (path / PACKAGE_NAME).is_file()
        and (path / CMVN_NAME).is_file()
    )


def is_fireredasr_llm_release_dir(path: str | Path) -> bool:
    path = Path(path)
    return (
        is_fireredasr_release_dir(path)
        and (path / ENCODER_PACKAGE_NAME).is_file()
        and (path / LLM_DIR_NAME).is_dir()
    )


def is_fireredasr_package(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and "model_state_dict" in obj
        and isinstance(obj.get("args"), argparse.Namespace)
    )


def load_package(
    path: str | Path, map_location: Any = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Load a ``*.pth.tar`` package (args Namespace + model_state_dict)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def load_package_args(path: str | Path) -> argparse.Namespace:
    try:
        package = load_package(path, mmap=True)
    except RuntimeError:
        # Legacy (non-zip) serialization cannot be memory-mapped.
        package = load_package(path)
    return package["args"]


def read_kaldi_matrix(path: str | Path) -> np.ndarray:
    """Read the first matrix of a Kaldi ark (binary ``DM``/``FM`` or text)."""
    data = Path(path).read_bytes()
    pos = data.find(b"\0B")
    if pos < 0:
        # Text ark: "key  [\n v v v\n v v v ]"
        text = data.decode()
        body = text[text.index("[") + 1 : text.index("]")]
        rows = [r.split() for r in body.strip().splitlines() if r.strip()]
        return np.array(rows, dtype=np.float64)
    pos += 2
    kind = data[pos : pos + 3]
    if kind not in (b"DM ", b"FM "):
        raise ValueError(f"{path}: unsupported Kaldi matrix type {kind!r}")
    dtype = np.float64 if kind == b"DM " else np.float32
    pos += 3
    dims = []
    for _ in range(2):
        size = data[pos]
        if size != 4:
            raise ValueError(f"{path}: bad Kaldi int size {size}")
        dims.append(struct.unpack("<i", data[pos + 1 : pos + 5])[0])
        pos += 5
    rows, cols = dims
    count = rows * cols
    mat = np.frombuffer(data, dtype=dtype, count=count, offset=pos)
    return mat.reshape(rows, cols).astype(np.float64)


def read_cmvn(path: str | Path) -> tuple[int, list[float], list[float]]:
    """Kaldi global CMVN stats -> (dim, means, inverse std), as the original."""
    stats = read_kaldi_matrix(path)
    if stats.shape[0] != 2:
        raise ValueError(f"{path}: expected 2 rows of CMVN stats")
    dim = stats.shape[1] - 1
    count = stats[0, dim]
    if count < 1:
        raise ValueError(f"{path}: CMVN frame count < 1")
    means = stats[0, :dim] / count
    var = np.maximum(stats[1, :dim] / count - means * means, 1e-20)
    return dim, means.tolist(), (1.0 / np.sqrt(var)).tolist()


def _aed_config_dict(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        idim=args.idim,
        odim=args.odim,
        vocab_size=args.odim,
        n_layers_enc=args.n_layers_enc,
        n_layers_dec=args.n_layers_dec,
        # FireRedLIDDecoder (the same TransformerDecoder as the AED's) reads
        # its depth from this name.
        n_layers_lid_dec=args.n_layers_dec,
        n_head=args.n_head,
        d_model=args.d_model,
        d_inner=getattr(args, "d_inner", 4 * args.d_model),
        kernel_size=args.kernel_size,
        pe_maxlen=args.pe_maxlen,
        sos_id=args.sos_id,
        eos_id=args.eos_id,
        pad_id=args.pad_id,
        blank_id=getattr(args, "blank_id", 0),
        input_length_max=float(getattr(args, "input_length_max", 60.0)),
        output_length_max=int(getattr(args, "output_length_max", 250)),
    )


class FireRedASRConfigParser(ConfigParserBase):
    """``config_format="fireredasr"``: build the config from the release files."""

    def parse(
        self,
        model: str | Path,
        trust_remote_code: bool,
        revision: str | None = None,
        code_revision: str | None = None,
        **kwargs,
    ) -> tuple[dict, PretrainedConfig]:
        model = Path(model)
        if not is_fireredasr_release_dir(model):
            raise ValueError(
                f"{model} is not a FireRedASR release directory "
                f"({PACKAGE_NAME} and {CMVN_NAME} expected)"
            )
        args = load_package_args(model / PACKAGE_NAME)
        if is_fireredasr_llm_release_dir(model):
            config_dict = self._llm_config_dict(model, args)
        else:
            config_dict = _aed_config_dict(args)
            config_dict.update(
                model_type="fireredasr_aed",
                architectures=[AED_ARCH],
                is_encoder_decoder=True,
                hidden_size=args.d_model,
                num_attention_heads=args.n_head,
                num_hidden_layers=args.n_layers_dec,
                # Decoder positions (absolute sinusoidal table).
                max_position_embeddings=args.pe_maxlen,
                bos_token_id=args.sos_id,
                eos_token_id=args.eos_id,
                pad_token_id=args.pad_id,
                decoder_start_token_id=args.sos_id,
                tie_word_embeddings=True,
            )
        if is_fireredasr_llm_release_dir(model):
            from transformers import Qwen2Config

            config = Qwen2Config(**config_dict)
        else:
            config = PretrainedConfig(**config_dict)
        hf_overrides = kwargs.get("hf_overrides")
        if isinstance(hf_overrides, dict):
            config.update(hf_overrides)
        return config_dict, config

    @staticmethod
    def _llm_config_dict(model: Path, args: argparse.Namespace) -> dict[str, Any]:
        from transformers import AutoConfig

        enc_args = load_package_args(model / ENCODER_PACKAGE_NAME)
        llm_config = AutoConfig.from_pretrained(os.fspath(model / LLM_DIR_NAME))
        config_dict = llm_config.to_dict()
        config_dict.update(
            architectures=[LLM_ARCH],
            audio_encoder_conf=dict(
                idim=enc_args.idim,
                n_layers_enc=enc_args.n_layers_enc,
                n_head=enc_args.n_head,
                d_model=enc_args.d_model,
                kernel_size=enc_args.kernel_size,
                pe_maxlen=enc_args.pe_maxlen,
            ),
            encoder_downsample_rate=int(args.encoder_downsample_rate),
            input_length_max=float(getattr(args, "input_length_max", 30.0)),
            output_length_max=int(getattr(args, "output_length_max", 150)),
        )
        return config_dict
