# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Text frontend of the CosyVoice models: normalisation and sentence
splitting of the input, as the original ``CosyVoiceFrontEnd.text_normalize``
does with ``wetext`` installed (its text normalisation FSTs: numbers, dates,
currency, units), or without it, as the original does when neither
``ttsfrd`` nor ``wetext`` is there (light clean-up only).

The original (``cosyvoice/cli/frontend.py``, helpers in
``cosyvoice/utils/frontend_utils.py``) turns one input into a list of
segments, each synthesized as its own LM run with the same voice. Steps, in
this order (:func:`text_normalize`):

* the text goes through untouched, as one segment, if it holds ``<|`` and
  ``|>`` (special tokens such as ``<|endofprompt|>``), or if the request says
  ``extra_args: {"text_frontend": false}``;
* leading / trailing whitespace is stripped;
* with ``wetext`` importable, the text goes through its ``Normalizer``
  first (``remove_erhua=False`` for Chinese text, the defaults otherwise;
  both detect the language), as the original's ``wetext`` frontend does;
* text with a CJK ideograph (U+4E00..U+9FFF, :func:`contains_chinese`):
  newlines removed; a space kept only between two non-space ASCII
  characters (:func:`replace_blank`); ``²`` / ``³`` -> ``平方`` / ``立方``;
  every ``.`` -> ``。``; `` - `` -> ``，``; ``（）【】`` and backquotes removed,
  ``——`` -> a space (:func:`remove_bracket`); trailing ``，,、`` -> ``。``;
  then split with ``lang="zh"`` (lengths in characters);
* other text: every run of digits spelled out in English words
  (:func:`spell_out_number`, ``inflect``'s ``number_to_words`` reading:
  ``2005`` -> ``two thousand and five``); then split with ``lang="en"``
  (lengths in tokens of the model's own tokenizer);
* segments made only of punctuation / symbols (Unicode ``P*`` / ``S*``) are
  dropped (:func:`is_only_punctuation`).

:func:`split_paragraph` is the original's splitter with its defaults
(``token_max_n=80``, ``token_min_n=60``, ``merge_len=20``,
``comma_split=False``): cut after each sentence mark (zh: ``。？！；：、.?!;``,
en: ``.?!;:``; a closing ``"`` / ``”`` right after stays with it), then join
sentences while the segment is at most ``token_min_n`` long or would stay
within ``token_max_n``; a last segment shorter than ``merge_len`` joins the one
before.

Not done: ``ttsfrd`` (the original's first choice, a ModelScope resource);
without ``wetext`` digits in Chinese text are left as digits and ``3.5`` in
English reads ``three. five``, exactly as the original without it. Where the
original fails (wetext's assertion on a few odd inputs: the text is kept as
is; an ``IndexError`` on a closing quote right after a leading sentence mark,
``inflect``'s error on numbers of more than 36 digits) this module goes on:
the quote is kept as its own piece, such numbers are read digit by digit.
Non-ASCII decimal digits are read by value (``inflect`` keeps their
leading zeros).

``extra_args`` options (:func:`split_request_text`): ``split_text: false``
normalises but keeps one segment (the original's ``split=False``);
``text_frontend: false`` leaves the text as given, in one segment (the
original's ``text_frontend=False``, which also leaves the prompt text as
is, :func:`normalize_prompt_text`).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

import regex

from vllm.logger import init_logger

logger = init_logger(__name__)

CountTokens = Callable[[str], int]

_CHINESE = re.compile(r"[\u4e00-\u9fff]")
_TRAILING_COMMAS = re.compile(r"[，,、]+$")
_ONLY_PUNCTUATION = regex.compile(r"[\p{P}\p{S}]*")

ZH_MARKS = ("。", "？", "！", "；", "：", "、", ".", "?", "!", ";")
EN_MARKS = (".", "?", "!", ";", ":")
COMMAS = ("，", ",")
CLOSING_QUOTES = ('"', "”")


# ------------------------------------------------------------- checks ----
def contains_chinese(text: str) -> bool:
    """Whether ``text`` holds a CJK unified ideograph (U+4E00..U+9FFF)."""
    return _CHINESE.search(text) is not None


def is_only_punctuation(text: str) -> bool:
    """True for text made only of Unicode punctuation / symbols (or empty)."""
    return _ONLY_PUNCTUATION.fullmatch(text) is not None


# ---------------------------------------------------- Chinese clean-up ----
def replace_blank(text: str) -> str:
    """Drop every space that does not stand between two non-space ASCII
    characters (spaces between Chinese characters go, ``a b`` stays)."""

    def keep(i: int) -> bool:
        if i == 0 or i == len(text) - 1:
            return False
        prev, nxt = text[i - 1], text[i + 1]
        return prev.isascii() and nxt.isascii() and prev != " " and nxt != " "

    return "".join(c for i, c in enumerate(text) if c != " " or keep(i))


def replace_corner_mark(text: str) -> str:
    return text.replace("²", "平方").replace("³", "立方")


def remove_bracket(text: str) -> str:
    for mark in ("（", "）", "【", "】", "`"):
        text = text.replace(mark, "")
    return text.replace("——", " ")


# ---------------------------------------------------- English numbers ----
_UNITS = ("", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEENS = (
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
)
_TENS = (
    "",
    "",
    "twenty",
    "thirty",
    "forty",
    "fifty",
    "sixty",
    "seventy",
    "eighty",
    "ninety",
)
_SCALES = (
    "",
    "thousand",
    "million",
    "billion",
    "trillion",
    "quadrillion",
    "quintillion",
    "sextillion",
    "septillion",
    "octillion",
    "nonillion",
    "decillion",
)


def _below_hundred(n: int) -> str:
    if n < 10:
        return _UNITS[n]
    if n < 20:
        return _TEENS[n - 10]
    tens, units = divmod(n, 10)
    return _TENS[tens] + (f"-{_UNITS[units]}" if units else "")


def _below_thousand(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    if not hundreds:
        return _below_hundred(rest)
    words = f"{_UNITS[hundreds]} hundred"
    return f"{words} and {_below_hundred(rest)}" if rest else words


def number_to_words(digits: str) -> str:
    """English words of a string of decimal digits, as ``inflect``'s
    ``engine().number_to_words`` reads it with its defaults: groups of three
    joined by ``", "``, ``"and"`` after ``hundred`` and before a last group
    below one hundred (``1001`` -> ``one thousand and one``, ``1100`` ->
    ``one thousand, one hundred``). Past decillions (``inflect`` raises) the
    digits are read one by one."""
    value = int(digits) if digits else 0
    if value == 0:
        return "zero"
    groups: list[int] = []  # lowest first
    while value:
        value, group = divmod(value, 1000)
        groups.append(group)
    if len(groups) > len(_SCALES):
        return " ".join(_UNITS[int(d)] or "zero" for d in str(int(digits)))
    parts = [
        _below_thousand(g) + (f" {_SCALES[i]}" if i else "")
        for i, g in reversed(list(enumerate(groups)))
        if g
    ]
    if len(parts) > 1 and 0 < groups[0] < 100:
        return ", ".join(parts[:-1]) + " and " + parts[-1]
    return ", ".join(parts)


def _spell_digits(run: str) -> str:
    # inflect drops what is not a decimal digit (e.g. "²", which isdigit()):
    # a run of those alone reads "zero".
    decimals = "".join(str(unicodedata.decimal(c)) for c in run if c.isdecimal())
    return number_to_words(decimals)


def spell_out_number(text: str) -> str:
    """Every run of ``str.isdigit`` characters -> :func:`number_to_words`."""
    out: list[str] = []
    start: int | None = None
    for i, c in enumerate(text):
        if c.isdigit():
            if start is None:
                start = i
            continue
        if start is not None:
            out.append(_spell_digits(text[start:i]))
            start = None
        out.append(c)
    if start is not None:
        out.append(_spell_digits(text[start:]))
    return "".join(out)


# ----------------------------------------------------------- splitting ----
def split_paragraph(
    text: str,
    count_tokens: CountTokens,
    lang: str = "zh",
    token_max_n: int = 80,
    token_min_n: int = 60,
    merge_len: int = 20,
    comma_split: bool = False,
) -> list[str]:
    """Split ``text`` into segments at sentence marks (the original's
    ``split_paragraph``). Lengths count characters for ``lang="zh"`` and
    ``count_tokens`` (the model tokenizer's token count) otherwise."""
    if not text:
        return []

    def length(s: str) -> int:
        return len(s) if lang == "zh" else count_tokens(s)

    marks = list(ZH_MARKS if lang == "zh" else EN_MARKS)
    if comma_split:
        marks.extend(COMMAS)
    if text[-1] not in marks:
        text += "。" if lang == "zh" else "."

    # 1. sentences: up to and including each mark (+ a closing quote)
    sentences: list[str] = []
    start = 0
    for i, c in enumerate(text):
        if c not in marks:
            continue
        if i > start:
            sentences.append(text[start : i + 1])
        if i + 1 < len(text) and text[i + 1] in CLOSING_QUOTES:
            # the quote goes to the last sentence (the original does so even
            # when the mark began no new sentence)
            if sentences:
                sentences[-1] += text[i + 1]
            else:
                sentences.append(text[i + 1])
            start = i + 2
        else:
            start = i + 1

    # 2. segments: sentences joined up to the length limits
    segments: list[str] = []
    current = ""
    for sentence in sentences:
        if length(current + sentence) > token_max_n and length(current) > token_min_n:
            segments.append(current)
            current = ""
        current += sentence
    if current:
        if segments and length(current) < merge_len:
            segments[-1] += current
        else:
            segments.append(current)
    return segments


# ------------------------------------------------------------ frontend ----
def _skips_frontend(text: str) -> bool:
    return "<|" in text and "|>" in text


@functools.cache
def wetext_normalizers() -> tuple[Any, Any] | None:
    """The original's ``wetext`` normalisers (Chinese, English), or None
    when ``wetext`` is not installed (the original's no-frontend branch)."""
    try:
        from wetext import Normalizer
    except ImportError:
        logger.info(
            "wetext is not installed: CosyVoice text normalisation "
            "is the original's light clean-up only"
        )
        return None
    return Normalizer(remove_erhua=False), Normalizer()


def _wetext(normalizer: Any, text: str) -> str:
    """``normalizer.normalize(text)``; the text as is where wetext fails
    (its token parser asserts on a few inputs, e.g. ``”³57】-（``, where the
    original raises)."""
    try:
        return normalizer.normalize(text)
    except Exception:  # noqa: BLE001
        logger.debug("wetext could not normalise %r; kept as is", text)
        return text


def _normalize(text: str) -> tuple[str, str]:
    """(normalised text, split language) of stripped, non-empty text."""
    tn = wetext_normalizers()
    if contains_chinese(text):
        if tn is not None:
            text = _wetext(tn[0], text)
        text = text.replace("\n", "")
        text = replace_blank(text)
        text = replace_corner_mark(text)
        text = text.replace(".", "。")
        text = text.replace(" - ", "，")
        text = remove_bracket(text)
        text = _TRAILING_COMMAS.sub("。", text)
        return text, "zh"
    if tn is not None:
        text = _wetext(tn[1], text)
    return spell_out_number(text), "en"


def text_normalize(text: str, count_tokens: CountTokens) -> list[str]:
    """The segments of ``text`` (``text_normalize(text, split=True)`` of the
    original without ttsfrd / wetext); possibly empty (only punctuation)."""
    if not text or _skips_frontend(text):
        return [text] if text else []
    text = text.strip()
    if not text:
        return []
    text, lang = _normalize(text)
    segments = split_paragraph(text, count_tokens, lang)
    return [s for s in segments if not is_only_punctuation(s)]


def normalize_text(text: str) -> str:
    """``text_normalize(text, split=False)`` of the original: the
    normalised text, not split (used for the zero-shot prompt text)."""
    if not text or _skips_frontend(text):
        return text
    text = text.strip()
    return _normalize(text)[0] if text else text


def _flag(extra: Mapping[str, Any] | None, key: str) -> bool:
    value = (extra or {}).get(key, True)
    if not isinstance(value, bool):
        raise ValueError(f"extra_args.{key} must be true or false")
    return value


def split_request_text(
    text: str, count_tokens: CountTokens, extra: Mapping[str, Any] | None = None
) -> list[str]:
    """The segments one request speaks, honouring ``extra_args``
    ``text_frontend`` (false: the text as given) and ``split_text`` (false:
    normalised, one segment). Empty when nothing is left to speak."""
    frontend = _flag(extra, "text_frontend")
    split = _flag(extra, "split_text")
    if not frontend:
        return [text] if text else []
    if not split:
        text = normalize_text(text)
        return [] if is_only_punctuation(text) else [text]
    return text_normalize(text, count_tokens)


def normalize_prompt_text(text: str, extra: Mapping[str, Any] | None = None) -> str:
    """The zero-shot prompt (reference) text as the original's
    ``inference_zero_shot`` feeds it: normalised, not split, unless
    ``extra_args.text_frontend`` is false."""
    return normalize_text(text) if _flag(extra, "text_frontend") else text
