# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Fish Speech tokenizer (fish-speech 1.5, OpenAudio S1): tiktoken BPE over
``tokenizer.tiktoken`` (lines ``base64(token) rank``; ``=`` is the empty token
and is skipped) with *positional* special ids, ``len(ranks) + index``:

* 1.5: a fixed order (its ``special_tokens.json`` is written but never read):
  begin/end of text, pad, im_start, im_end, 4 placeholders, text, voice,
  interleave, then ``<|semantic:0..1023|>``.
* S1: the key order of ``special_tokens.json`` (its id values are ignored), or
  the code's default list when the file is missing.

Release directories of S2 ship a Hugging Face tokenizer and use the ``hf``
mode. ``encode`` allows every special token inline and adds nothing, as the
original ``FishTokenizer.encode``.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from transformers import BatchEncoding

from vllm.tokenizers.protocol import TokenizerLike

TIKTOKEN_NAME = "tokenizer.tiktoken"
SPECIAL_TOKENS_NAME = "special_tokens.json"

FISH_TIKTOKEN_PATTERN = "|".join(
    [
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",
        r"\p{P}",
        r"[^\r\n\p{L}\p{N}]?\p{L}+",
        r"\p{N}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(\?!\S)",
        r"\s+",
    ]
)
_MAX_ENCODE_CHARS = 400_000

IM_END_TOKEN = "<|im_end|>"
_SEMANTIC_RE = re.compile(r"<\|semantic:(\d+)\|>")


def _semantic(n: int) -> list[str]:
    return [f"<|semantic:{i}|>" for i in range(n)]


# fish-speech v1.5.x fish_speech/tokenizer.py (hard-coded, positional)
SPECIAL_TOKENS_V15 = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|pad|>",
    "<|im_start|>",
    "<|im_end|>",
    *[f"<|placeholder:{i}|>" for i in range(4)],
    "<|text|>",
    "<|voice|>",
    "<|interleave|>",
    *_semantic(1024),
]

# OpenAudio S1 code's default list (used when special_tokens.json is absent)
SPECIAL_TOKENS_S1_DEFAULT = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|pad|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|phoneme_start|>",
    "<|phoneme_end|>",
    "<|tool_call_start|>",
    "<|tool_call_end|>",
    "<|text|>",
    "<|voice|>",
    "<|interleave|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio|>",
    *_semantic(1024),
]


def is_fish_tiktoken_dir(path: str | Path) -> bool:
    return Path(path, TIKTOKEN_NAME).is_file()


def fish_version_of_dir(path: str | Path) -> str:
    """'1.5' or 's1' from the release ``config.json`` (1.5's has no
    ``attention_qk_norm`` key)."""
    cfg = Path(path, "config.json")
    if cfg.is_file():
        with open(cfg, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("fish_version") in ("1.5", "s1"):
            return data["fish_version"]
        if data.get("model_type") == "dual_ar" and "attention_qk_norm" not in data:
            return "1.5"
    return "s1"


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'base64 rank'")
            token, rank = parts
            if token == "=":  # the empty token (S1 writes it, then skips it)
                continue
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def special_tokens_for_dir(path: str | Path, version: str | None = None) -> list[str]:
    version = version or fish_version_of_dir(path)
    if version == "1.5":
        return list(SPECIAL_TOKENS_V15)
    sp = Path(path, SPECIAL_TOKENS_NAME)
    if sp.is_file():
        with open(sp, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{sp}: expected a JSON object of special tokens")
        return list(data.keys())  # ids re-numbered by key order, as S1 does
    return list(SPECIAL_TOKENS_S1_DEFAULT)


class FishSpeechTokenizer(TokenizerLike):
    def __init__(
        self,
        tiktoken_path: str | Path,
        special_tokens: list[str],
        *,
        truncation_side: str = "left",
    ):
        import tiktoken

        ranks = load_tiktoken_ranks(tiktoken_path)
        begin = len(ranks)
        self.special_tokens = {tok: begin + i for i, tok in enumerate(special_tokens)}
        self._encoding = tiktoken.Encoding(
            name=Path(tiktoken_path).stem,
            pat_str=FISH_TIKTOKEN_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self._num_ranks = begin
        self._id_to_bytes: dict[int, bytes] = {v: k for k, v in ranks.items()}
        self._id_to_special = {v: k for k, v in self.special_tokens.items()}
        sem = {}
        for tok, i in self.special_tokens.items():
            m = _SEMANTIC_RE.fullmatch(tok)
            if m:
                sem[int(m.group(1))] = i
        self.semantic_id_to_token_id = sem
        self.semantic_begin_id = sem[0] if sem else None
        self.semantic_end_id = sem[max(sem)] if sem else None
        self.im_end_id = self.special_tokens.get(IM_END_TOKEN)
        self._truncation_side = truncation_side

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        *args,
        trust_remote_code: bool = False,
        revision: str | None = None,
        download_dir: str | None = None,
        **kwargs,
    ) -> FishSpeechTokenizer:
        path = Path(path_or_repo_id)
        if not (path / TIKTOKEN_NAME).is_file():
            raise FileNotFoundError(f"{path / TIKTOKEN_NAME} not found")
        return cls(
            path / TIKTOKEN_NAME,
            special_tokens_for_dir(path),
            truncation_side=kwargs.get("truncation_side", "left"),
        )

    def num_special_tokens_to_add(self) -> int:
        return 0

    @property
    def all_special_tokens(self) -> list[str]:
        return list(self.special_tokens)

    @property
    def all_special_ids(self) -> list[int]:
        return list(self.special_tokens.values())

    @property
    def bos_token_id(self) -> int:
        return self.special_tokens.get("<|begin_of_text|>")

    @property
    def eos_token_id(self) -> int:
        return self.im_end_id

    @property
    def pad_token_id(self) -> int:
        return self.special_tokens.get("<|pad|>")

    @property
    def is_fast(self) -> bool:
        return False

    @property
    def vocab_size(self) -> int:
        return self._num_ranks + len(self.special_tokens)

    @property
    def max_token_id(self) -> int:
        return self.vocab_size - 1

    @cached_property
    def max_chars_per_token(self) -> int:
        return max(len(t) for t in self._vocab)

    @property
    def truncation_side(self) -> str:
        return self._truncation_side

    def __len__(self) -> int:
        return self.vocab_size

    # Token strings: a BPE token's bytes as latin-1 (one char per byte), so
    # that partial UTF-8 sequences survive incremental detokenization;
    # convert_tokens_to_string undoes it.
    def _token_str(self, i: int) -> str:
        if i in self._id_to_special:
            return self._id_to_special[i]
        b = self._id_to_bytes.get(i)
        return "" if b is None else b.decode("latin-1")

    @cached_property
    def _vocab(self) -> dict[str, int]:
        v = {b.decode("latin-1"): i for i, b in self._id_to_bytes.items()}
        v.update(self.special_tokens)
        return v

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def get_added_vocab(self) -> dict[str, int]:
        return dict(self.special_tokens)

    def encode(
        self,
        text: str,
        truncation: bool | None = None,
        max_length: int | None = None,
        add_special_tokens: bool = True,
    ) -> list[int]:
        subs = [
            text[i : i + _MAX_ENCODE_CHARS]
            for i in range(0, len(text), _MAX_ENCODE_CHARS)
        ]
        ids: list[int] = sum(
            self._encoding.encode_batch(
                subs,
                allowed_special=self._encoding.special_tokens_set,
                disallowed_special=set(),
            ),
            start=[],
        )
        if truncation and max_length is not None and len(ids) > max_length:
            ids = (
                ids[-max_length:]
                if self._truncation_side == "left"
                else ids[:max_length]
            )
        return ids

    def __call__(
        self,
        text: str | list[str],
        text_pair: str | None = None,
        add_special_tokens: bool = True,
        truncation: bool = False,
        max_length: int | None = None,
    ) -> BatchEncoding:
        if isinstance(text, str):
            ids: Any = self.encode(text, truncation, max_length)
            mask: Any = [1] * len(ids)
        else:
            ids = [self.encode(t, truncation, max_length) for t in text]
            mask = [[1] * len(i) for i in ids]
        return BatchEncoding({"input_ids": ids, "attention_mask": mask})

    def apply_chat_template(self, messages, tools=None, **kwargs):
        raise ValueError(
            "Fish Speech has no chat template; build the prompt with "
            "its speech prompt format"
        )

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self._vocab[tokens]
        return [self._vocab[t] for t in tokens]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out: list[str] = []
        buf = bytearray()
        for t in tokens:
            if t in self.special_tokens:
                if buf:
                    out.append(buf.decode("utf-8", errors="replace"))
                    buf.clear()
                out.append(t)
            else:
                buf.extend(t.encode("latin-1"))
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def convert_ids_to_tokens(
        self,
        ids: Sequence[int],
        skip_special_tokens: bool = False,
    ) -> list[str]:
        return [
            self._token_str(i)
            for i in ids
            if not (skip_special_tokens and i in self._id_to_special)
        ]

    def decode(
        self, ids: Sequence[int] | int, skip_special_tokens: bool = False
    ) -> str:
        if isinstance(ids, int):
            ids = [ids]
        return self.convert_tokens_to_string(
            self.convert_ids_to_tokens(ids, skip_special_tokens)
        )


def fish_special_ids(path: str | Path) -> tuple[int, int, int]:
    """(semantic_begin_id, semantic_end_id, im_end_id) of a 1.5/S1 release
    directory, without building the BPE encoder."""
    ranks = load_tiktoken_ranks(Path(path, TIKTOKEN_NAME))
    specials = special_tokens_for_dir(path)
    ids = {tok: len(ranks) + i for i, tok in enumerate(specials)}
    sem = {
        int(m.group(1)): ids[t] for t in specials if (m := _SEMANTIC_RE.fullmatch(t))
    }
    if not sem or IM_END_TOKEN not in ids:
        raise ValueError(
            f"{path}: the special tokens have no <|semantic:N|> or {IM_END_TOKEN}"
        )
    return sem[0], sem[max(sem)], ids[IM_END_TOKEN]


def is_fish_dual_ar_dir(path: str | Path) -> bool:
    """A local fish-speech 1.5 / OpenAudio S1 release directory
    (``config.json`` with ``model_type: dual_ar``, no HF tokenizer)? Raises
    if its ``tokenizer.tiktoken`` is missing."""
    cfg = Path(path, "config.json")
    if not cfg.is_file() or Path(path, "tokenizer.json").is_file():
        return False
    try:
        with open(cfg, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    if model_type != "dual_ar":
        return False
    if not Path(path, TIKTOKEN_NAME).is_file():
        raise FileNotFoundError(
            f"{Path(path, TIKTOKEN_NAME)} not found: a Fish Speech dual_ar "
            "release directory needs its tokenizer.tiktoken (and, for S1, "
            "special_tokens.json)"
        )
    return True
