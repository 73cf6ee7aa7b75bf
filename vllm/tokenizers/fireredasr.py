# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""FireRedASR-AED tokenizer: ``dict.txt`` + SentencePiece (``train_bpe1000.model``).

One Chinese character is one token; other text is split into SentencePiece
pieces (``▁`` marks a word start). Decoding joins the tokens and turns ``▁``
into spaces, as the original ``ChineseCharEnglishSpmTokenizer.detokenize``.
"""

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import BatchEncoding

from vllm.tokenizers.protocol import TokenizerLike

DICT_NAME = "dict.txt"
SPM_NAME = "train_bpe1000.model"
SPM_SPACE = "\u2581"

_CJK = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff])")


def read_token_dict(path: str | Path) -> list[str]:
    """``dict.txt``: "token index" per line; ``<space>`` means " "."""
    id2word: list[str] = []
    with open(path, encoding="utf8") as f:
        for i, line in enumerate(f):
            parts = line.strip().split()
            if len(parts) >= 2:
                word, index = parts[0], int(parts[1])
            elif len(parts) == 1:
                word, index = parts[0], i
            else:
                word, index = " ", i
            if index != len(id2word):
                raise ValueError(f"{path}:{i + 1}: ids must be 0..N-1 in order")
            id2word.append(" " if word == "<space>" else word)
    return id2word


class FireRedASRTokenizer(TokenizerLike):
    def __init__(
        self,
        dict_path: str | Path,
        spm_path: str | Path | None = None,
        *,
        sos: str = "<sos>",
        eos: str = "<eos>",
        pad: str = "<pad>",
        unk: str = "<unk>",
        truncation_side: str = "left",
    ):
        self.id2word = read_token_dict(dict_path)
        self.word2id = {w: i for i, w in enumerate(self.id2word)}
        self._sp = None
        if spm_path is not None and Path(spm_path).is_file():
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor()
            self._sp.Load(str(spm_path))
        self._sos = self.word2id.get(sos)
        self._eos = self.word2id.get(eos)
        self._pad = self.word2id.get(pad)
        self._unk = self.word2id.get(unk)
        self._truncation_side = truncation_side
        self._specials = re.compile(
            "("
            + "|".join(
                re.escape(w)
                for w in self.id2word
                if w.startswith("<") and w.endswith(">") and len(w) > 2
            )
            + ")"
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        *args,
        trust_remote_code: bool = False,
        revision: str | None = None,
        download_dir: str | None = None,
        **kwargs,
    ) -> "FireRedASRTokenizer":
        path = Path(path_or_repo_id)
        if not (path / DICT_NAME).is_file():
            raise FileNotFoundError(f"{path / DICT_NAME} not found")
        return cls(
            path / DICT_NAME,
            path / SPM_NAME,
            truncation_side=kwargs.get("truncation_side", "left"),
        )

    # Special ids: only <eos> is hidden. The original's detokenize prints every
    # other id of the hypothesis (its text keeps e.g. "<unk>").
    def num_special_tokens_to_add(self) -> int:
        return 0

    @property
    def all_special_tokens(self) -> list[str]:
        return [self.id2word[i] for i in self.all_special_ids]

    @property
    def all_special_ids(self) -> list[int]:
        return [self._eos] if self._eos is not None else []

    @property
    def bos_token_id(self) -> int:
        return self._sos

    @property
    def eos_token_id(self) -> int:
        return self._eos

    @property
    def pad_token_id(self) -> int:
        return self._pad

    @property
    def is_fast(self) -> bool:
        return False

    @property
    def vocab_size(self) -> int:
        return len(self.id2word)

    @property
    def max_token_id(self) -> int:
        return len(self.id2word) - 1

    @property
    def max_chars_per_token(self) -> int:
        return max(len(w) for w in self.id2word)

    @property
    def truncation_side(self) -> str:
        return self._truncation_side

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return dict(self.word2id)

    def get_added_vocab(self) -> dict[str, int]:
        return {}

    def _tokenize(self, text: str) -> list[str]:
        tokens: list[str] = []
        for chunk in self._specials.split(text):
            if not chunk:
                continue
            if chunk in self.word2id and chunk.startswith("<"):
                tokens.append(chunk)
                continue
            for part in _CJK.split(chunk.upper()):
                if not part.strip():
                    continue
                if _CJK.fullmatch(part):
                    tokens.append(part)
                elif self._sp is not None:
                    tokens.extend(self._sp.EncodeAsPieces(part.strip()))
                else:
                    tokens.extend(c if c != " " else " " for c in part.strip())
        return tokens

    def encode(
        self,
        text: str,
        truncation: bool | None = None,
        max_length: int | None = None,
        add_special_tokens: bool = True,
    ) -> list[int]:
        ids = self.convert_tokens_to_ids(self._tokenize(text))
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
        raise ValueError("FireRedASR has no chat template")

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.word2id.get(tokens, self._unk)
        return [self.word2id.get(t, self._unk) for t in tokens]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens).replace(SPM_SPACE, " ")

    def convert_ids_to_tokens(
        self,
        ids: Sequence[int],
        skip_special_tokens: bool = False,
    ) -> list[str]:
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.id2word[i] for i in ids if i not in special]

    def decode(
        self, ids: Sequence[int] | int, skip_special_tokens: bool = False
    ) -> str:
        if isinstance(ids, int):
            ids = [ids]
        return self.convert_tokens_to_string(
            self.convert_ids_to_tokens(ids, skip_special_tokens)
        ).strip()
