# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""SoulX-Podcast multi-speaker dialogue TTS (``Soul-AILab/SoulX-Podcast-1.7B``
and ``-1.7B-dialect``).

The release directory is loaded as published (see
``vllm/transformers_utils/soulx_podcast.py``): the LM is a stock Qwen3 over
one vocabulary of text ids, the SoulX special tokens and the speech tokens
(``s3 code + speech_token_offset``); the audio side is CosyVoice2's flow +
HiFT (``flow.pt``, ``hift.pt``) with a CAM++ x-vector per speaker.

What differs from vLLM's ``Qwen3ForCausalLM`` is the glue of the original
``SoulXPodcast.forward_longform``:

* prompts (``soulxpodcast/utils/dataloader.py``): per speaker ``i``
  ``[<|task_podcast|> if i == 0] <|SPEAKER_i|><|text_start|>{prompt text}
  <|text_end|><|semantic_token_start|>`` + its prompt speech tokens + the
  speech eos; then each dialogue turn ``<|SPEAKER_j|><|text_start|>{text}
  <|text_end|><|semantic_token_start|>`` generated until the speech eos, the
  generated tokens kept in the context of the next turns, with the
  original's context reset (more than 10 turns or 6192 tokens);
* sampling (``engine/llm_engine.py::HFLLMEngine``,
  ``models/modules/sampler.py``): min-length on the speech eos, repetition
  penalty 1.25 on the *generated* tokens only, temperature 0.6, top-k 100,
  top-p 0.9, then repetition-aware sampling (window 25 including prompt
  tokens, tau 0.2) that falls back to the raw logits. It runs as the model's
  own sampler (the V1 runner's ``SupportsMultiCodebook`` hook, no auxiliary
  codebooks), as CosyVoice2's does, on ``ras_distribution``;
* audio: each turn through the flow + HiFT with its speaker's prompt
  tokens, prompt mel and x-vector (``CosyVoice2SpeechDecoder``), the turns
  concatenated (or streamed one after another);
* dialect prompts (the ``-1.7B-dialect`` release, ``forward_longform``'s
  ``use_dialect_prompt``): before the dialogue each speaker's prompt is
  re-generated from a dialect text (``<|Sichuan|>...``); the generated
  tokens replace the prompt's transcript and speech tokens in the LM context
  of every turn (context resets included), not in the flow's conditioning
  (see ``dialect_prompt_inputs``).

In ``/v1/audio/speech`` the ``input`` is the dialogue script
(``[S1]text[S2]text...``, tags as the original web UI parses them) and
``voices`` names one voice per speaker (registered voices or presets of the
release's optional ``spk2info.pt``). Each turn is one engine request built
from the turns before it (``speech_segments_in_context``).
``extra_args={"dialect_prompt_text": [...]}`` (one text per voice, ``""`` for
none) asks for the dialect prompts: one engine request per speaker before
the turns (``get_speech_prelude``), whose tokens reach every turn's prompt
as ``TextToSpeechParams.prelude``.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from functools import lru_cache
from itertools import chain
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.models.cosyvoice2 import (
    CAMPPLUS_NAME,
    SPEECH_TOKENIZER_NAME,
    CosyVoice2SpeechDecoder,
    ras_distribution,
    sample_from,
)
from vllm.model_executor.models.cosyvoice_token2wav import CosyVoice2Token2Wav
from vllm.model_executor.models.interfaces import (
    SupportsMultiCodebook,
    SupportsSpeechGeneration,
)
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

if TYPE_CHECKING:
    from vllm.config import ModelConfig
    from vllm.config.text_to_speech import (
        TextToSpeechConfig,
        TextToSpeechParams,
        VoicePrompt,
    )
    from vllm.outputs import CompletionOutput
    from vllm.sampling_params import SamplingParams
    from vllm.v1.sample.metadata import SamplingMetadata

logger = init_logger(__name__)

_SAMPLING_EPS = 1e-5
SPK2INFO_NAME = "spk2info.pt"

# soulxpodcast/utils/dataloader.py
SPEAKER_TOKENS = ("<|SPEAKER_0|>", "<|SPEAKER_1|>", "<|SPEAKER_2|>", "<|SPEAKER_3|>")
TEXT_START, TEXT_END, AUDIO_START = (
    "<|text_start|>",
    "<|text_end|>",
    "<|semantic_token_start|>",
)
TASK_PODCAST = "<|task_podcast|>"
# soulxpodcast/utils/parser.py (dialect prompts) and the paralinguistic tags
# the release's tokenizer holds
DIALECT_TAGS = ("<|Henan|>", "<|Sichuan|>", "<|Yue|>")
PARALINGUISTIC_TAGS = (
    "<|laughter|>",
    "<|sigh|>",
    "<|breathing|>",
    "<|coughing|>",
    "<|throat_clearing|>",
)
MAX_SPEAKERS = len(SPEAKER_TOKENS)
# extra_args key of the dialect prompt texts (the original's
# ``dialect_prompt_text``, one per speaker)
DIALECT_PROMPT_KEY = "dialect_prompt_text"

_CJK = "\u4e00-\u9fff"


# ------------------------------------------------------------------ text ----
def normalize_text(text: str) -> str:
    """``soulxpodcast/utils/text.py::normalize_text``: drop the spaces
    between CJK characters and between CJK and latin letters, and end the
    text with ``。`` (CJK) or ``.`` (latin) when it has no final mark."""
    text = re.sub(rf"([{_CJK}])\s+([{_CJK}])", r"\1\2", text)
    text = re.sub(rf"([a-zA-Z])\s+([{_CJK}])", r"\1\2", text)
    text = re.sub(rf"([{_CJK}])\s+([a-zA-Z])", r"\1\2", text)
    if re.search(rf"[{_CJK}]$", text):
        if text[-1] not in ",.?!。，？！":
            text += "。"
    elif re.search(r"[a-zA-Z]$", text) and text[-1] not in ".!?":
        text += "."
    return text


_TURN = re.compile(r"(\[S[0-9]\][^\[\]]*)")
_TAG = re.compile(r"(\[S[1-9]\])(.+)")


def parse_dialogue(script: str) -> list[tuple[int, str]]:
    """The turns of a dialogue script as (speaker index, text), the way the
    original web UI reads ``[S1]text[S2]text...``: each ``[S<n>]`` starts a
    turn that runs to the next bracket; the text is what follows the tag on
    its line (leading space kept). A script without any tag is one turn of
    speaker 1. Raises ``ValueError`` for what the original rejects (unknown
    tags, empty turns) and for text it would silently drop (before the
    first tag, or inside other brackets)."""
    script = script.strip()
    if not re.search(r"\[S[0-9]\]", script):
        if "[" in script or "]" in script:
            raise ValueError(
                "the dialogue script has brackets but no speaker tags; write "
                "turns as [S1]text[S2]text (paralinguistic tags are written "
                "like <|laughter|>)"
            )
        return [(0, script)]
    head = script[: script.index("[")]
    if head.strip():
        raise ValueError(
            f"text before the first speaker tag: {head.strip()[:40]!r}; every "
            "turn must start with [S1], [S2], [S3] or [S4]"
        )
    if re.search(r"[\[\]]", re.sub(r"\[S[0-9]\]", "", script)):
        raise ValueError(
            "brackets other than the speaker tags [S1]..[S4] are not allowed "
            "in the dialogue script (paralinguistic tags are written like "
            "<|laughter|>)"
        )
    turns = [t.strip() for t in _TURN.findall(script)]
    out = []
    for t in turns:
        tag = t[:4]
        if tag not in ("[S1]", "[S2]", "[S3]", "[S4]"):
            raise ValueError(f"unknown speaker tag {tag}; use [S1], [S2], [S3] or [S4]")
        if not t[4:].strip():
            raise ValueError(f"empty turn for {tag}")
        m = _TAG.match(t)
        if m is None or "\n" in t:
            # the original reads a turn's text up to the end of its tag's line
            raise ValueError(
                f"a turn of {tag} spans several lines; write each turn on the "
                "line of its tag"
            )
        out.append((int(m.group(1)[2]) - 1, m.group(2)))
    return out


def speaker_prompt_text(index: int, prompt_text: str) -> str:
    """The LM prompt text of speaker ``index`` (before its speech tokens)."""
    text = (
        f"{SPEAKER_TOKENS[index]}{TEXT_START}{normalize_text(prompt_text)}"
        f"{TEXT_END}{AUDIO_START}"
    )
    return f"{TASK_PODCAST}{text}" if index == 0 else text


def turn_text(speaker: int, text: str) -> str:
    """The LM input of one dialogue turn (generation continues after it)."""
    text = normalize_text(text)
    return f"{SPEAKER_TOKENS[speaker]}{TEXT_START}{text}{TEXT_END}{AUDIO_START}"


def dialect_prompt_inputs(
    prompts: Sequence[Sequence[int]],
    dialect_ids: Sequence[Sequence[int]],
    task_ids: Sequence[int],
) -> list[list[int]]:
    """The inputs ``forward_longform`` re-generates each speaker's prompt
    from (``use_dialect_prompt``): the task token (speaker 0's prompt
    already starts with it), the speaker's zero-shot prompt (transcript,
    speech tokens, speech eos), then its dialect text as a turn
    (``<|SPEAKER_i|><|text_start|>{dialect text}<|text_end|>
    <|semantic_token_start|>``). Each is generated on its own, with the
    turns' sampling."""
    return [
        (list(task_ids) if i > 0 else []) + list(p) + list(d)
        for i, (p, d) in enumerate(zip(prompts, dialect_ids))
    ]


def dialect_prompts(
    dialect_ids: Sequence[Sequence[int]],
    generated: Sequence[Sequence[int]],
    task_ids: Sequence[int],
) -> list[list[int]]:
    """The speakers' prompts after the re-generation, as
    ``forward_longform`` keeps them for every turn and for the context
    reset: the task token before speaker 0, the dialect text, the generated
    tokens (the speech eos included when generated). The zero-shot
    transcript and speech tokens are gone from the LM context."""
    return [
        (list(task_ids) if i == 0 else []) + list(d) + list(g)
        for i, (d, g) in enumerate(zip(dialect_ids, generated))
    ]


def dialogue_context(
    prompts: Sequence[Sequence[int]],
    previous: Sequence[tuple[Sequence[int], Sequence[int]]],
    turn: Sequence[int],
    max_turn_size: int = 10,
    turn_tokens_threshold: int = 6192,
    prompt_context: int = 2,
    history_context: int = 2,
    history_text_context: int = 2,
) -> list[int]:
    """The LM input of the next turn, as ``forward_longform`` builds it:
    the speakers' prompts, every previous turn (its text ids + generated
    ids), then ``turn``. Before a turn, when more than ``max_turn_size``
    turns are in context or the context is longer than
    ``turn_tokens_threshold`` tokens, it restarts from the first
    ``prompt_context`` prompts, then the text-only (no
    ``<|semantic_token_start|>``) history turns before the last
    ``history_context``, then those last full turns.

    ``previous``: (turn text ids, generated ids) of the turns before."""
    prompt_inputs = [list(p) for p in prompts]
    history_inputs = [list(p) for p in prompts]
    inputs = list(chain.from_iterable(prompt_inputs))
    valid_turns = len(prompt_inputs)
    steps: list[tuple[Sequence[int], Sequence[int] | None]] = [
        *previous,
        (turn, None),
    ]
    for text_ids, out_ids in steps:
        if valid_turns > max_turn_size or len(inputs) > turn_tokens_threshold:
            bound = max(
                prompt_context,
                len(history_inputs) - history_text_context - history_context,
            )
            inputs = list(
                chain.from_iterable(
                    history_inputs[:prompt_context]
                    + history_inputs[bound:-history_context]
                    + prompt_inputs[-history_context:]
                )
            )
            valid_turns = prompt_context + len(history_inputs) - bound
        valid_turns += 1
        inputs.extend(text_ids)
        if out_ids is None:
            break
        inputs.extend(out_ids)
        prompt_inputs.append(list(text_ids) + list(out_ids))
        history_inputs.append(list(text_ids)[:-1])
    return inputs


# -------------------------------------------------------------- sampling ----
def soulx_penalize_generated(
    logits: torch.Tensor,
    output_token_ids: Sequence[Sequence[int]],
    penalties: torch.Tensor,
) -> torch.Tensor:
    """HF ``RepetitionPenaltyLogitsProcessor(prompt_ignore_length=len(prompt))``:
    every id generated so far gets ``score * p`` (score < 0) or
    ``score / p``, once per id; prompt ids are not penalised."""
    rows, vocab = logits.shape
    row_idx = [i for i, ids in enumerate(output_token_ids[:rows]) for _ in ids]
    if not row_idx:
        return logits
    tok_idx = list(chain.from_iterable(output_token_ids[:rows]))
    dev = logits.device
    mask = torch.zeros((rows, vocab + 1), dtype=torch.bool, device=dev)
    mask[
        torch.tensor(row_idx, dtype=torch.long).to(dev),
        torch.tensor(tok_idx, dtype=torch.long).remainder(vocab + 1).to(dev),
    ] = True
    p = torch.where(mask[:, :vocab], penalties[:rows, None].to(logits.dtype), 1.0)
    return torch.where(logits < 0, logits * p, logits / p)


def soulx_scores(
    logits: torch.Tensor,
    speech_eos: int,
    min_token_rows: Sequence[int] = (),
    output_token_ids: Sequence[Sequence[int]] | None = None,
    repetition_penalties: torch.Tensor | None = None,
) -> torch.Tensor:
    """The original's logits processors before the warpers, in its order:
    ``min_new_tokens`` (the speech eos of ``min_token_rows`` to -inf), then
    the repetition penalty on the generated ids."""
    if min_token_rows:
        idx = torch.tensor(list(min_token_rows), dtype=torch.long, device=logits.device)
        logits = logits.clone()
        logits[idx, speech_eos] = float("-inf")
    if output_token_ids is not None and repetition_penalties is not None:
        logits = soulx_penalize_generated(
            logits, output_token_ids, repetition_penalties
        )
    return logits


def soulx_law(
    scores: torch.Tensor,
    raw_logits: torch.Tensor,
    history: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    win_size: int,
    tau_r: float,
) -> torch.Tensor:
    """The distribution ``_ras_sample_hf_engine`` draws the next token from
    (per row): temperature, top-k, top-p on ``scores`` give ``N``; a
    candidate ``c ~ N`` that occurs ``count + 1 >= win_size * tau_r`` times
    in ``history`` (the last ``win_size`` ids, prompt included) sends the
    draw to ``softmax(raw_logits)``, otherwise the token is drawn again
    from ``N``: ``P = (1 - p_rep) N + p_rep F``."""
    return ras_distribution(
        scores / temperature[:, None],
        history,
        top_p,
        top_k,
        win_size,
        tau_r,
        fallback_logits=raw_logits,
        redraw=True,
        count_offset=1,
        top_k_first=True,
    )


# ----------------------------------------------------------------- model ----
class SoulXPodcastForCausalLM(
    Qwen3ForCausalLM, SupportsSpeechGeneration, SupportsMultiCodebook
):
    """SoulX-Podcast: vLLM's Qwen3 LM with the original's dialogue prompts,
    sampler and CosyVoice2 audio decoder."""

    supports_speech_generation_only = True
    supports_multi_codebook: ClassVar[Literal[True]] = True
    # the RAS window counts prompt tokens too (input_ids[-win_size:])
    codebook_history_includes_prompt: ClassVar[bool] = True
    # each turn is generated in the context of the turns before it
    speech_segments_in_context: ClassVar[bool] = True
    supports_multi_speaker: ClassVar[bool] = True
    # no auxiliary codes: the token ids alone make the inputs, so prefix
    # caching stays on (each turn's prompt extends the previous one)
    multi_codebook_prefix_caching: ClassVar[bool] = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        self.speech_eos = int(config.soulx_speech_eos_id)
        sampling = dict(config.soulx_sampling)
        self.win_size = int(sampling["win_size"])
        self.tau_r = float(sampling["tau_r"])
        self.num_aux_codebooks = 0
        self.codebook_history_window = self.win_size

    # ---- engine interface ------------------------------------------------
    @classmethod
    def get_aux_codebook_sizes(cls, model_config: ModelConfig) -> list[int]:
        return []

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        aux_codes: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def sample_codebooks(
        self,
        logits: torch.Tensor,
        hidden_states: torch.Tensor,
        sampling_metadata: SamplingMetadata,
        history: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The original's HF-path sampler, one row per request:
        min-length (speech eos), repetition penalty on generated ids,
        temperature, top-k, top-p give the scores ``N``; RAS draws from
        ``N`` unless the candidate would repeat (``count + 1 >= win_size *
        tau_r`` in the last ``win_size`` ids, prompt included), then from the
        raw logits. Greedy rows (temperature 0) take the argmax of the
        processed scores (no RAS)."""
        md = sampling_metadata
        raw = logits.float()
        rows = raw.shape[0]
        scores, min_rows = self._apply_logitsprocs(raw.clone(), md)
        scores = soulx_scores(
            scores,
            self.speech_eos,
            min_rows,
            None if md.no_penalties else md.output_token_ids,
            None if md.no_penalties else md.repetition_penalties,
        )
        if md.temperature is None or md.all_greedy:
            ids = scores.argmax(dim=-1)
        else:
            dev = scores.device
            temperature = md.temperature[:rows].float()
            greedy = temperature < _SAMPLING_EPS
            top_p = (
                md.top_p[:rows].float()
                if md.top_p is not None
                else torch.ones(rows, device=dev)
            )
            top_k = (
                md.top_k[:rows].long()
                if md.top_k is not None
                else torch.zeros(rows, device=dev, dtype=torch.long)
            )
            law = soulx_law(
                scores,
                raw,
                history[..., 0].to(dev).long(),
                torch.where(greedy, 1.0, temperature),
                top_p,
                top_k,
                self.win_size,
                self.tau_r,
            )
            ids = sample_from(law, md.generators)
            if not md.all_random:
                ids = torch.where(greedy, scores.argmax(dim=-1), ids)
        ids = ids.long()
        return ids, ids.new_zeros(rows, 0)

    @staticmethod
    def _apply_logitsprocs(
        logits: torch.Tensor, md: SamplingMetadata
    ) -> tuple[torch.Tensor, list[int]]:
        """The request's logits processors (e.g. logit_bias) except
        min_tokens, whose rows are returned instead: the original holds back
        only the speech eos (HF ``min_new_tokens``), not every stop id."""
        from vllm.v1.sample.logits_processor.builtin import (
            MinTokensLogitsProcessor,
        )

        min_rows: list[int] = []
        for proc in md.logitsprocs.non_argmax_invariant:
            if isinstance(proc, MinTokensLogitsProcessor):
                min_rows = sorted(
                    i for i, (n, out, _) in proc.min_toks.items() if len(out) < n
                )
                continue
            logits = proc.apply(logits)
        return logits, min_rows

    # ---- speech generation glue -----------------------------------------
    @classmethod
    def get_speech_config(cls, model_config: ModelConfig) -> TextToSpeechConfig:
        from vllm.config.text_to_speech import TextToSpeechConfig

        hf = model_config.hf_config
        sampling = dict(hf.soulx_sampling)
        model_dir = model_config.model
        cloning = all(
            os.path.isfile(os.path.join(model_dir, n))
            for n in (CAMPPLUS_NAME, SPEECH_TOKENIZER_NAME)
        )
        return TextToSpeechConfig(
            sample_rate=int(hf.soulx_sample_rate),
            frame_rate=float(hf.soulx_token_frame_rate),
            max_input_chars=16384,
            max_ref_audio_s=30.0,  # the speech tokenizer's limit
            ref_audio_sample_rate=16000,
            default_max_new_tokens=int(sampling["max_tokens"]),
            supports_voice_cloning=cloning,
            default_sampling={
                k: sampling[k]
                for k in ("temperature", "top_p", "top_k", "repetition_penalty")
            },
        )

    @classmethod
    def get_speech_presets(cls, model_config: ModelConfig) -> list[str]:
        return list(_load_spk2info(model_config.model))

    @classmethod
    def _tokenizer(cls, model_config: ModelConfig) -> _SoulXTokenizer:
        return get_soulx_tokenizer(model_config.model)

    @classmethod
    def _speaker_voices(cls, params: TextToSpeechParams) -> list[VoicePrompt]:
        """The request's voices, one per speaker (presets resolved)."""
        voices: list[Any] = list(params.voices or [])
        if not voices and params.voice is not None:
            voices = [params.voice]
        if not voices and params.speaker is not None:
            voices = [params.speaker]
        if not voices:
            raise ValueError(
                "SoulX-Podcast needs a voice for each speaker: pass `voices` "
                "(one registered voice or preset per [S1], [S2], ...), or "
                "`voice` / `ref_audio` + `ref_text` for a one-speaker script"
            )
        if len(voices) > MAX_SPEAKERS:
            raise ValueError(
                f"{len(voices)} voices given; SoulX-Podcast has at most "
                f"{MAX_SPEAKERS} speakers"
            )
        mc = params.model_config
        out = []
        for i, v in enumerate(voices):
            if isinstance(v, str):
                v = _preset_voice(mc.model, v)
            if v.codes is None or len(np.asarray(v.codes).reshape(-1)) == 0:
                raise ValueError(f"the voice of speaker S{i + 1} has no speech tokens")
            if not (v.ref_text or "").strip():
                raise ValueError(f"the voice of speaker S{i + 1} has no transcript")
            size = int(mc.hf_config.soulx_speech_token_size)
            codes = np.asarray(v.codes).reshape(-1)
            if codes.min() < 0 or codes.max() >= size:
                raise ValueError(f"voice speech tokens must lie in [0, {size})")
            out.append(v)
        return out

    @classmethod
    def split_speech_text(cls, params: TextToSpeechParams) -> list[str]:
        """The dialogue turns, each its own engine request (``[S<n>]`` kept
        in the segment text). Validates the script against the voices."""
        turns = parse_dialogue(params.text)
        n_voices = len(cls._speaker_voices(params))
        for spk, _ in turns:
            if spk >= n_voices:
                raise ValueError(
                    f"the script has turns of [S{spk + 1}] but only "
                    f"{n_voices} voice(s) were given"
                )
        return [f"[S{spk + 1}]{text}" for spk, text in turns]

    @classmethod
    def dialect_texts(
        cls, params: TextToSpeechParams, num_speakers: int
    ) -> list[str] | None:
        """``extra_args.dialect_prompt_text``: one dialect text per speaker
        (``voices`` order), ``""`` for a speaker without one; a string for a
        one-speaker request. A text must start with ``<|Henan|>``,
        ``<|Sichuan|>`` or ``<|Yue|>`` (the original's parser). None when
        not asked for, or when every text is empty (the original then skips
        the re-generation); otherwise every speaker's prompt is
        re-generated, an empty text too, as the original does."""
        value = (params.extra or {}).get(DIALECT_PROMPT_KEY)
        if value is None:
            return None
        key = f"extra_args.{DIALECT_PROMPT_KEY}"
        if isinstance(value, str) and num_speakers == 1:
            value = [value]
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise ValueError(
                f"{key} must be a list of strings, one dialect prompt text per "
                'voice ("" for a speaker without one)'
            )
        if len(value) != num_speakers:
            raise ValueError(
                f"{key} has {len(value)} text(s) for {num_speakers} speaker "
                'voice(s); give one per voice, in order ("" for none)'
            )
        tok = None
        for i, text in enumerate(value):
            if not text:
                continue
            tag = next((t for t in DIALECT_TAGS if text.startswith(t)), None)
            if tag is None:
                raise ValueError(
                    f"{key}[{i}] (speaker S{i + 1}) must start with a dialect "
                    f"tag: {', '.join(DIALECT_TAGS)}"
                )
            if tok is None:
                tok = cls._tokenizer(params.model_config)
            try:
                tok.token_id(tag)
            except ValueError:
                raise ValueError(
                    f"{key}: this model's tokenizer has no {tag} token; dialect "
                    "prompts need the SoulX-Podcast-1.7B-dialect release"
                ) from None
            if not text[len(tag) :].strip():
                raise ValueError(f"{key}[{i}] (speaker S{i + 1}) has no text")
        return list(value) if any(value) else None

    @classmethod
    def _dialect_ids(
        cls, model_config: ModelConfig, texts: Sequence[str]
    ) -> tuple[list[list[int]], list[int]]:
        tok = cls._tokenizer(model_config)
        dialect = [tok.encode(turn_text(i, t)) for i, t in enumerate(texts)]
        return dialect, tok.encode(TASK_PODCAST)

    @classmethod
    def get_speech_prelude(
        cls, params: TextToSpeechParams, sampling_kwargs: dict[str, Any]
    ) -> list[tuple[Any, SamplingParams]]:
        """The engine requests to run before the turns: with dialect
        prompts, one per speaker (``dialect_prompt_inputs``), sampled as the
        turns are (the original passes the same ``SamplingParams``); none
        otherwise. Their generated ids come back as ``params.prelude``."""
        from vllm.inputs import TokensPrompt

        mc = params.model_config
        voices = cls._speaker_voices(params)
        texts = cls.dialect_texts(params, len(voices))
        if texts is None:
            return []
        dialect, task = cls._dialect_ids(mc, texts)
        inputs = dialect_prompt_inputs(cls.speaker_prompts(mc, voices), dialect, task)
        return [
            (
                TokensPrompt(prompt_token_ids=ids),
                cls.get_speech_sampling_params(params, dict(sampling_kwargs)),
            )
            for ids in inputs
        ]

    @classmethod
    def context_prompts(
        cls, params: TextToSpeechParams, voices: Sequence[VoicePrompt]
    ) -> list[list[int]]:
        """The speakers' prompts the turns are generated after: the
        zero-shot prompts, or with dialect prompts the re-generated ones
        (``params.prelude``)."""
        mc = params.model_config
        texts = cls.dialect_texts(params, len(voices))
        if texts is None:
            return cls.speaker_prompts(mc, voices)
        if len(params.prelude) != len(voices):
            raise ValueError(
                "dialect prompts: the re-generated speaker prompts are missing "
                f"(got {len(params.prelude)} for {len(voices)} speakers; run "
                "get_speech_prelude first)"
            )
        dialect, task = cls._dialect_ids(mc, texts)
        return dialect_prompts(dialect, params.prelude, task)

    @classmethod
    def speaker_prompts(
        cls, model_config: ModelConfig, voices: Sequence[VoicePrompt]
    ) -> list[list[int]]:
        """Each speaker's zero-shot prompt: its prompt text (the task token
        before the first) + its speech tokens + the speech eos."""
        tok = cls._tokenizer(model_config)
        hf = model_config.hf_config
        offset = int(hf.soulx_speech_token_offset)
        prompts = []
        for i, v in enumerate(voices):
            text_ids = tok.encode(speaker_prompt_text(i, v.ref_text))
            speech = [int(t) + offset for t in np.asarray(v.codes).reshape(-1)]
            prompts.append(text_ids + speech + [int(hf.soulx_speech_eos_id)])
        return prompts

    @classmethod
    def _turn_ids(
        cls, model_config: ModelConfig, segment_text: str
    ) -> tuple[int, list[int]]:
        ((spk, text),) = parse_dialogue(segment_text)
        return spk, cls._tokenizer(model_config).encode(turn_text(spk, text))

    @classmethod
    def get_speech_generation_prompt(cls, params: TextToSpeechParams) -> Any:
        from vllm.inputs import TokensPrompt

        mc = params.model_config
        voices = cls._speaker_voices(params)
        spk, turn = cls._turn_ids(mc, params.text)
        previous = [
            (cls._turn_ids(mc, text)[1], list(out)) for text, out in params.context
        ]
        ids = dialogue_context(
            cls.context_prompts(params, voices),
            previous,
            turn,
            **dict(mc.hf_config.soulx_context),
        )
        params.voice = voices[spk]  # the decoder conditions on the speaker
        return TokensPrompt(prompt_token_ids=ids)

    @classmethod
    def get_speech_sampling_params(
        cls, params: TextToSpeechParams, sampling_kwargs: dict[str, Any]
    ) -> SamplingParams:
        from vllm.sampling_params import SamplingParams

        hf = params.model_config.hf_config
        defaults = dict(hf.soulx_sampling)
        kwargs = {
            k: defaults[k]
            for k in ("temperature", "top_p", "top_k", "repetition_penalty")
        }
        kwargs.update(sampling_kwargs)
        limit = int(defaults["max_tokens"])
        max_tokens = max(1, min(int(kwargs.pop("max_tokens", limit) or limit), limit))
        # Stops on the speech eos only (the original's stopping criterion);
        # the tokenizer's eos is an ordinary id here.
        return SamplingParams(
            **kwargs,
            max_tokens=max_tokens,
            min_tokens=min(int(defaults["min_tokens"]), max_tokens),
            stop_token_ids=[int(hf.soulx_speech_eos_id)],
            ignore_eos=True,
            detokenize=False,
            skip_special_tokens=False,
        )

    @classmethod
    def get_speech_frames(
        cls, output: CompletionOutput, model_config: ModelConfig
    ) -> np.ndarray:
        """The speech tokens of a turn, as the original hands them to the
        flow: up to the speech eos, minus the offset (ids outside the speech
        range, which a trained model does not emit, are dropped)."""
        hf = model_config.hf_config
        ids = np.asarray(list(output.token_ids), dtype=np.int64)
        stop = ids == int(hf.soulx_speech_eos_id)
        if stop.any():
            ids = ids[: int(np.argmax(stop))]
        lo = int(hf.soulx_speech_token_offset)
        ids = ids[(ids >= lo) & (ids < lo + int(hf.soulx_speech_token_size))] - lo
        return ids.reshape(-1, 1)

    @classmethod
    def get_speech_decoder(
        cls, model_config: ModelConfig, device: torch.device
    ) -> SoulXPodcastSpeechDecoder:
        return SoulXPodcastSpeechDecoder(model_config.model, device)


# --------------------------------------------------------------- decoder ----
class SoulXToken2Wav(CosyVoice2Token2Wav):
    """CosyVoice2's flow + HiFT as SoulX-Podcast runs them: the release's
    ``flow.pt`` / ``hift.pt`` at the CosyVoice2-0.5B dims (the original
    builds ``CausalMaskedDiffWithXvec()`` / ``HiFTGenerator()`` with their
    defaults), 15 Euler steps. Other dims (e.g. a small test release) can
    be given as ``flow`` / ``hift`` mappings in ``soulxpodcast_config.json``,
    in the layout of the ``cosyvoice2.yaml`` sections; the original ignores
    those keys."""

    N_TIMESTEPS = 15

    @classmethod
    def from_pretrained(
        cls, model_dir: str, device: str | torch.device = "cpu", **kwargs: Any
    ) -> SoulXToken2Wav:
        from vllm.transformers_utils.soulx_podcast import soulx_settings

        conf = soulx_settings(model_dir)
        dims = {k: conf[k] for k in ("flow", "hift") if isinstance(conf.get(k), dict)}
        return cls.from_settings(
            model_dir,
            {**dims, "sample_rate": 24000},
            device,
            n_timesteps=cls.N_TIMESTEPS,
            **kwargs,
        )


class SoulXPodcastSpeechDecoder(CosyVoice2SpeechDecoder):
    """Speech tokens of one turn -> 24 kHz audio, conditioned on the turn's
    speaker (prompt tokens, prompt mel, CAM++ x-vector). Reference audio is
    volume-normalised as the original's dataloader does, then encoded as
    CosyVoice2's zero-shot frontend does (``speech_tokenizer_v2.onnx``: the
    s3tokenizer ``speech_tokenizer_v2_25hz`` the original downloads at run
    time, not part of the release; add it to the directory for cloning)."""

    def __init__(self, model_dir: str, device: torch.device):
        super().__init__(model_dir, device, token2wav_cls=SoulXToken2Wav)

    def encode_reference(
        self, audio: np.ndarray, sample_rate: int, ref_text: str
    ) -> VoicePrompt:
        audio = audio_volume_normalize(np.asarray(audio, np.float32))
        return super().encode_reference(audio, sample_rate, ref_text)


def audio_volume_normalize(audio: np.ndarray, coeff: float = 0.1) -> np.ndarray:
    """``soulxpodcast/utils/audio.py::audio_volume_normalize``: scale quiet
    audio up to a 0.1 peak, then the mean of the 90th-99th percentile of
    the magnitudes above 0.01 to ``coeff`` (gain clamped to [0.1, 10]), and
    keep the peak at most 1."""
    audio = np.asarray(audio, np.float32)
    mags = np.sort(np.abs(audio))
    if mags.size == 0:
        return audio
    if mags[-1] < 0.1:
        audio = audio / max(float(mags[-1]), 1e-3) * 0.1
    mags = mags[mags > 0.01]
    n = mags.shape[0]
    if n <= 10:
        return audio
    volume = float(np.mean(mags[int(0.9 * n) : int(0.99 * n)]))
    audio = audio * float(np.clip(coeff / volume, 0.1, 10))
    peak = float(np.max(np.abs(audio)))
    if peak > 1:
        audio = audio / peak
    return audio.astype(np.float32)


# --------------------------------------------------------------- helpers ----
class _SoulXTokenizer:
    """The release's HF tokenizer, as ``AutoTokenizer(...).encode``."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        with self._lock:
            return list(self.tokenizer.encode(text))

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token}")
        return int(tid)


@lru_cache(maxsize=8)
def get_soulx_tokenizer(path: str) -> _SoulXTokenizer:
    return _SoulXTokenizer(path)


@lru_cache(maxsize=8)
def _load_spk2info(model_dir: str) -> dict[str, dict[str, Any]]:
    """Optional presets: ``spk2info.pt`` in the layout of CosyVoice2's
    ``add_zero_shot_spk``, the transcript as a string (``prompt_text``,
    ``llm_prompt_speech_token`` / ``flow_prompt_speech_token``,
    ``prompt_speech_feat``, ``flow_embedding``)."""
    path = os.path.join(model_dir, SPK2INFO_NAME)
    if not os.path.isfile(path):
        return {}
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of speakers")
    return data


def _preset_voice(model_dir: str, name: str) -> VoicePrompt:
    from vllm.config.text_to_speech import VoicePrompt

    presets = _load_spk2info(model_dir)
    if name not in presets:
        raise ValueError(f"unknown preset voice {name!r}")
    info = presets[name]
    tokens = info.get("flow_prompt_speech_token", info.get("llm_prompt_speech_token"))
    feat = info.get("prompt_speech_feat")
    emb = info.get("flow_embedding", info.get("embedding"))
    if tokens is None or feat is None or emb is None:
        raise ValueError(
            f"preset {name!r} is not a zero-shot speaker (needs prompt speech "
            "tokens, prompt_speech_feat and an embedding)"
        )
    extra: dict[str, Any] = {
        "prompt_feat": torch.as_tensor(feat).float().reshape(-1, 80).numpy(),
        "embedding": torch.as_tensor(emb).float().reshape(-1).numpy(),
    }
    text = info.get("prompt_text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"preset {name!r} has no prompt_text transcript (a string)")
    codes = torch.as_tensor(tokens).reshape(-1).long().numpy()
    return VoicePrompt(ref_text=text, codes=codes, extra=extra, name=name)


__all__ = ["SoulXPodcastForCausalLM"]
