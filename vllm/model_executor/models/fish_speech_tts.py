# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Text-to-speech glue of the Fish Speech models (``SupportsSpeechGeneration``).

Prompts are built part by part, each text part tokenized on its own, as the
original code does for each family:

* 1.5 (``generate_long`` + ``encode_tokens``; text through ``clean_text``)::

    [<|im_start|>system\\n Speak out the provided text. <|im_end|> (with references)
     per reference: <|im_start|>user\\n {ref_text} <|im_end|>
                    <|im_start|>assistant\\n <|voice|> {codes} <|im_end|>]
    <|im_start|>user\\n {text} <|im_end|> <|im_start|>assistant\\n <|voice|>

* S1 (``ContentSequence(modality="interleave")``)::

    <|interleave|> [per reference: <|speaker:0|> {ref_text} {codes} <|im_end|>]
    <|speaker:0|> {text}

* S2 (``Conversation``; every ``<|im_end|>`` is followed by a newline)::

    <|im_start|>system\\n convert the provided text to speech reference to the
    following:\\n\\nText:\\n <|speaker:0|>{ref_text}... \\n\\nSpeech:\\n {codes}
    <|im_end|>\\n                      (or "convert the provided text to speech")
    <|im_start|>user\\n {text} <|im_end|>\\n <|im_start|>assistant\\n <|voice|>

Reference codes ``[num_codebooks, T]`` enter the prompt as semantic tokens
(``codes[0] + semantic_begin_id``) plus ``prompt_aux_codes`` rows for the
residual codebooks. Generation stops at ``<|im_end|>``. The frames handed to
the codec are ``[T, num_codebooks]``: codebook 0 from the semantic token,
then the residual codes (the ``<|im_end|>`` frame is dropped, as S1/S2 do;
1.5's original also dropped the first frame, an off-by-one not copied). Long inputs
are synthesized in one request; the originals' iterative text splitting is
left to the client.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vllm.config.text_to_speech import TextToSpeechConfig, TextToSpeechParams
from vllm.inputs import TokensPrompt
from vllm.sampling_params import SamplingParams
from vllm.v1.worker.multi_codebook import PROMPT_AUX_CODES_KEY

if TYPE_CHECKING:
    import torch

    from vllm.config import ModelConfig
    from vllm.outputs import CompletionOutput

SAMPLE_RATE = 44100
SAMPLES_PER_FRAME = 2048
FIREFLY_FILE = "firefly-gan-vq-fsq-8x1024-21hz-generator.pth"
DAC_FILE = "codec.pth"
IM_END = "<|im_end|>"

# Defaults of each family's inference entry point (generate_long).
DEFAULT_SAMPLING: dict[str, dict[str, Any]] = {
    "1.5": dict(temperature=0.7, top_p=0.7, repetition_penalty=1.2),
    "s1": dict(temperature=0.8, top_p=0.8, repetition_penalty=1.1),
    "s2": dict(temperature=1.0, top_p=0.9, top_k=30),
}

_EMOJI = re.compile(
    "[\U0001f600-\U0001f64f\U0001f300-\U0001f5ff"
    "\U0001f680-\U0001f6ff\U0001f1e0-\U0001f1ff]+"
)


def clean_text_v15(text: str) -> str:
    """fish-speech 1.5's ``clean_text``."""
    text = text.strip().replace("\u2018", "'").replace("\u2019", "'")
    text = _EMOJI.sub("", text)
    return re.sub(r",{2,}", ",", text)


def fish_version(model_config: ModelConfig) -> str:
    version = getattr(model_config.hf_config, "fish_version", None)
    if version not in DEFAULT_SAMPLING:
        raise ValueError(f"not a Fish Speech config (fish_version={version!r})")
    return version


def _tokenizer(model_config: ModelConfig):
    from vllm.tokenizers import cached_tokenizer_from_config

    return cached_tokenizer_from_config(model_config)


def _special_id(tok, token: str) -> int:
    ids = tok.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the tokenizer has no single token {token!r}")
    return ids[0]


def semantic_begin_id(model_config: ModelConfig) -> int:
    value = getattr(model_config.hf_config, "semantic_begin_id", None)
    if value is None:
        value = _special_id(_tokenizer(model_config), "<|semantic:0|>")
    return int(value)


class _PromptBuilder:
    def __init__(self, model_config: ModelConfig) -> None:
        self.tok = _tokenizer(model_config)
        self.num_codebooks = int(model_config.hf_config.num_codebooks)
        self.begin = semantic_begin_id(model_config)
        self.ids: list[int] = []
        self.aux_rows: list[list[int]] = []

    def text(self, *parts: str) -> None:
        for part in parts:
            self.ids += self.tok.encode(part, add_special_tokens=False)

    def codes(self, codes: np.ndarray) -> None:
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[0] < self.num_codebooks:
            raise ValueError(
                f"reference codes must be [{self.num_codebooks}, T], got {codes.shape}"
            )
        codes = codes[: self.num_codebooks]
        start = len(self.ids)
        self.ids += (codes[0] + self.begin).tolist()
        for t in range(codes.shape[1]):
            self.aux_rows.append([start + t, *codes[1:, t].tolist()])

    def prompt(self) -> TokensPrompt:
        return TokensPrompt(prompt_token_ids=self.ids)


def build_fish_prompt(
    model_config: ModelConfig,
    text: str,
    references: list[tuple[str, np.ndarray]] = (),  # type: ignore[assignment]
) -> tuple[list[int], list[list[int]]]:
    """Token ids and ``prompt_aux_codes`` rows of a request."""
    version = fish_version(model_config)
    b = _PromptBuilder(model_config)
    if version == "1.5":
        text = clean_text_v15(text)
        if references:
            b.text("<|im_start|>system\n", "Speak out the provided text.", IM_END)
        for ref_text, codes in references:
            b.text("<|im_start|>user\n", clean_text_v15(ref_text), IM_END)
            b.text("<|im_start|>assistant\n", "<|voice|>")
            b.codes(codes)
            b.text(IM_END)
        b.text("<|im_start|>user\n", text, IM_END)
        b.text("<|im_start|>assistant\n", "<|voice|>")
    elif version == "s1":
        b.text("<|interleave|>")
        for ref_text, codes in references:
            b.text("<|speaker:0|>", ref_text)
            b.codes(codes)
            b.text(IM_END)
        b.text("<|speaker:0|>", text)
    else:  # s2
        if references:
            tagged = [
                t if re.search(r"<\|speaker:\d+\|>", t) else f"<|speaker:{i}|>{t}"
                for i, (t, _) in enumerate(references)
            ]
            b.text(
                "<|im_start|>system\n",
                "convert the provided text to speech reference to the "
                "following:\n\nText:\n",
                "\n".join(tagged),
                "\n\nSpeech:\n",
            )
            b.codes(np.concatenate([c for _, c in references], axis=1))
        else:
            b.text("<|im_start|>system\n", "convert the provided text to speech")
        b.text(IM_END + "\n")
        b.text("<|im_start|>user\n", text, IM_END + "\n")
        b.text("<|im_start|>assistant\n<|voice|>")
    return b.ids, b.aux_rows


class FishSpeechTTSMixin:
    """``SupportsSpeechGeneration`` of the Fish Speech dual-AR models."""

    supports_speech_generation = True
    supports_speech_generation_only = True

    @classmethod
    def get_speech_config(cls, model_config: ModelConfig) -> TextToSpeechConfig:
        version = fish_version(model_config)
        return TextToSpeechConfig(
            sample_rate=SAMPLE_RATE,
            frame_rate=SAMPLE_RATE / SAMPLES_PER_FRAME,
            max_input_chars=4096,
            max_ref_audio_s=60.0,
            default_max_new_tokens=min(2048, model_config.max_model_len // 2),
            supports_voice_cloning=True,
            default_sampling=dict(DEFAULT_SAMPLING[version]),
        )

    @classmethod
    def get_speech_generation_prompt(cls, params: TextToSpeechParams) -> TokensPrompt:
        refs = []
        if params.voice is not None and params.voice.codes is not None:
            refs.append((params.voice.ref_text, np.asarray(params.voice.codes)))
        ids, rows = build_fish_prompt(params.model_config, params.text, refs)
        prompt = TokensPrompt(prompt_token_ids=ids)
        params.extra[PROMPT_AUX_CODES_KEY] = rows
        return prompt

    @classmethod
    def get_speech_sampling_params(
        cls, params: TextToSpeechParams, sampling_kwargs: dict[str, Any]
    ) -> SamplingParams:
        tok = _tokenizer(params.model_config)
        rows = params.extra.pop(PROMPT_AUX_CODES_KEY, None)
        extra_args = {PROMPT_AUX_CODES_KEY: rows} if rows else None
        return SamplingParams(
            **sampling_kwargs,
            stop_token_ids=[_special_id(tok, IM_END)],
            detokenize=False,
            skip_special_tokens=False,
            extra_args=extra_args,
        )

    @classmethod
    def get_speech_frames(
        cls, output: CompletionOutput, model_config: ModelConfig
    ) -> np.ndarray:
        cfg = model_config.hf_config
        k = int(cfg.num_codebooks)
        ids = np.asarray(output.token_ids, dtype=np.int64)
        aux = output.aux_token_ids
        if aux is None:
            aux = np.zeros((len(ids), k - 1), np.int64)
        # As the original: codebook 0 is the token minus semantic_begin_id,
        # clamped (a non-semantic token gives code 0); the <|im_end|> frame
        # that ends generation is not audio.
        c0 = np.clip(
            ids - semantic_begin_id(model_config), 0, int(cfg.codebook_size) - 1
        )
        frames = np.concatenate([c0[:, None], np.asarray(aux, np.int64)], axis=1)
        im_end = _special_id(_tokenizer(model_config), IM_END)
        return frames[ids != im_end]

    @classmethod
    def get_speech_decoder(cls, model_config: ModelConfig, device: torch.device):
        from vllm.model_executor.models.fish_speech_codec import (
            FireflyGANVQ,
            FishCodecSpeechDecoder,
            FishDAC,
        )

        root = Path(model_config.model)
        if (root / FIREFLY_FILE).is_file():
            codec = FireflyGANVQ.from_pretrained(root / FIREFLY_FILE, device=device)
        elif (root / DAC_FILE).is_file():
            codec = FishDAC.from_pretrained(root / DAC_FILE, device=device)
        else:
            raise FileNotFoundError(
                f"{root} has no Fish codec ({FIREFLY_FILE} for 1.5, "
                f"{DAC_FILE} for S1/S2)"
            )
        return FishCodecSpeechDecoder(codec)
