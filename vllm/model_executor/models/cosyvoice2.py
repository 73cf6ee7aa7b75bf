# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""CosyVoice2 text-to-speech LM (``FunAudioLLM/CosyVoice2-0.5B``).

Loads the original release directory (``cosyvoice2.yaml``, ``llm.pt``,
``CosyVoice-BlankEN/``, ``flow.pt``, ``hift.pt``; see
``vllm/transformers_utils/cosyvoice2.py``) without conversion.

The LM is the original ``cosyvoice.llm.llm.Qwen2LM``: a Qwen2 backbone fed
``[sos] + text + [task_id] + prompt speech tokens`` and decoding speech
tokens with ``llm_decoder``. Here it runs on one *unified* id space::

    [0, V_text)                     text ids -> Qwen2 embed_tokens rows
    V_text + 0, V_text + 1          sos/eos, task_id -> llm_embedding rows
    V_text + 2 + s (s < S + 3)      speech token s -> speech_embedding rows

stored as one embedding table, so prompts are plain token ids (no
``prompt_embeds``). ``compute_logits`` puts the ``llm_decoder`` logits in the
speech slice and ``-inf`` elsewhere. Sampling is the original's
repetition-aware sampling (RAS), run by the model itself through the V1
runner's ``SupportsMultiCodebook`` hook with no auxiliary codebooks.

Speech generation glue (``SupportsSpeechGeneration``): prompt layouts of the
original frontend (zero-shot, cross-lingual, instruct2, ``spk2info.pt``
speakers), its text normalisation and sentence splitting without ttsfrd /
wetext (``cosyvoice_frontend.py``; one LM run per segment), min/max lengths
from the text length, and a ``SpeechDecoder`` on
the flow + HiFT token2wav (``cosyvoice_token2wav.py``), offline and
streaming.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn as nn

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.interfaces import (
    SupportsMultiCodebook,
    SupportsSpeechGeneration,
)
from vllm.model_executor.models.qwen2 import Qwen2Model
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

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
QWEN_DIR_NAME = "CosyVoice-BlankEN"
SPK2INFO_NAME = "spk2info.pt"
CAMPPLUS_NAME = "campplus.onnx"
SPEECH_TOKENIZER_NAME = "speech_tokenizer_v2.onnx"
ENDOFPROMPT = "<|endofprompt|>"
# cosyvoice/tokenizer/tokenizer.py (QwenTokenizer, CosyVoice2)
COSYVOICE2_SPECIAL_TOKENS = {
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "additional_special_tokens": [
        "<|im_start|>",
        "<|im_end|>",
        "<|endofprompt|>",
        "[breath]",
        "<strong>",
        "</strong>",
        "[noise]",
        "[laughter]",
        "[cough]",
        "[clucking]",
        "[accent]",
        "[quick_breath]",
        "<laughter>",
        "</laughter>",
        "[hissing]",
        "[sigh]",
        "[vocalized-noise]",
        "[lipsmack]",
        "[mn]",
    ],
}


# ------------------------------------------------------------ id space ----
class CosyVoice2Vocab:
    """Offsets of the unified id space (from the parsed config)."""

    # Speech tokens the original drops from the output after this many in a
    # row (``CosyVoiceModel.llm_job``); CosyVoice2 has none.
    silent_tokens: tuple[int, ...] = ()
    max_silent_run = 5

    def __init__(self, config: Any):
        self.text_vocab_size = int(config.cosyvoice_text_vocab_size)
        self.speech_token_size = int(config.cosyvoice_speech_token_size)
        self.sos = self.text_vocab_size  # llm_embedding[0] (sos_eos)
        self.task_id = self.text_vocab_size + 1  # llm_embedding[1]
        self.speech_offset = self.text_vocab_size + 2
        self.num_speech_rows = self.speech_token_size + 3
        self.vocab_size = self.speech_offset + self.num_speech_rows
        # Qwen2LM: eos = S, (S + 1 unused), fill = S + 2; all three stop.
        self.eos = self.speech_offset + self.speech_token_size
        self.stop_token_ids = [self.eos + i for i in range(3)]

    def speech_ids(self, tokens: Iterable[int]) -> list[int]:
        return [self.speech_offset + int(t) for t in tokens]

    def frames(self, token_ids: Iterable[int]) -> np.ndarray:
        """The speech tokens of generated ids, as the original hands them to
        token2wav: up to the first stop id, runs of silent tokens cut after
        ``max_silent_run``."""
        ids = np.asarray(list(token_ids), dtype=np.int64)
        stop = np.isin(ids, self.stop_token_ids)
        if stop.any():
            ids = ids[: int(np.argmax(stop))]
        lo = self.speech_offset
        ids = ids[(ids >= lo) & (ids < lo + self.speech_token_size)] - lo
        return drop_long_silences(ids, self.silent_tokens, self.max_silent_run)


def drop_long_silences(
    tokens: np.ndarray, silent: Iterable[int], max_run: int
) -> np.ndarray:
    """Keep the first ``max_run`` tokens of every run of ``silent`` tokens
    (``CosyVoiceModel.llm_job``: the LM still saw the dropped ones)."""
    silent = list(silent)
    if not silent or tokens.size == 0:
        return tokens
    is_silent = np.isin(tokens, silent)
    count = np.cumsum(is_silent)
    # silent count at the last non-silent token before each position
    base = np.maximum.accumulate(np.where(is_silent, 0, count))
    return tokens[~is_silent | (count - base <= max_run)]


# ------------------------------------------------------------ sampling ----
def ras_distribution(
    logits: torch.Tensor,
    history: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    win_size: int,
    tau_r: float,
    banned: torch.Tensor | None = None,
    exclude_repeated: bool = False,
    *,
    fallback_logits: torch.Tensor | None = None,
    redraw: bool = False,
    count_offset: int = 0,
    top_k_first: bool = False,
) -> torch.Tensor:
    """The distribution of the original ``ras_sampling`` for each row.

    ``ras_sampling`` draws ``x`` from the nucleus (sorted, stable; kept while
    cumulative probability < top_p and count < top_k); if ``x`` occurs
    ``>= win_size * tau_r`` times in the last ``win_size`` generated tokens it
    draws again from the full softmax. Its output law is therefore
    ``P(x) = N(x) [x not repeated] + (sum_y N(y) [y repeated]) F(x)`` with
    ``N`` the renormalised nucleus and ``F`` the full softmax. ``banned``
    [R, V] rows (min length not reached) reject the eos id as the original
    ``sampling_ids`` retry loop does: the law conditioned on not eos.

    ``exclude_repeated``: the later ``ras_sampling`` (CosyVoice3 era) sets the
    repeated draw's score to ``-inf`` before the fallback draw, so that draw
    comes from the softmax without that token: ``P(x) = N(x) [x not
    repeated] + sum_{y repeated, y != x} N(y) F(x) / (1 - F(y))``.

    The HF-generate form of RAS (SoulX-Podcast's ``_ras_sample_hf_engine``)
    differs in four ways, each a keyword: the fallback draw comes from other
    scores (``fallback_logits``: the raw logits, before penalty, temperature
    and min-length); when the candidate is not repeated the token is drawn
    again from the nucleus (``redraw``: ``P = (1 - p_rep) N + p_rep F``); the
    trigger counts the candidate itself (``count_offset`` 1:
    ``count + 1 >= win_size * tau_r``); and top-p is taken over the top-k
    renormalised distribution (``top_k_first``, HF's warper order).

    logits [R, V] fp32 (speech slice), history [R, W] ids in the same index
    space (-1 = none), top_p [R] float, top_k [R] int (<= 0: no limit).
    """
    rows, vocab = logits.shape
    full = logits.softmax(dim=-1)
    sorted_p, sorted_idx = full.sort(dim=-1, descending=True, stable=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p
    rank = torch.arange(vocab, device=logits.device).expand(rows, vocab)
    k = torch.where(top_k > 0, top_k, vocab).to(rank.dtype)
    in_top_k = rank < k[:, None]
    threshold = top_p[:, None]
    if top_k_first:
        # top-p of the renormalised top-k distribution
        threshold = threshold * (sorted_p * in_top_k).sum(dim=-1, keepdim=True)
    keep_sorted = (before < threshold) & in_top_k
    keep_sorted[:, 0] = True
    nucleus_sorted = torch.where(keep_sorted, sorted_p, 0.0)
    nucleus = torch.zeros_like(full).scatter_(1, sorted_idx, nucleus_sorted)
    nucleus = nucleus / nucleus.sum(dim=-1, keepdim=True)
    # Occurrences of each id in the window.
    hist = history[:, -win_size:] if win_size > 0 else history[:, :0]
    valid = (hist >= 0) & (hist < vocab)
    counts = torch.zeros_like(full).scatter_add_(
        1, hist.clamp(0, vocab - 1).long(), valid.to(full.dtype)
    )
    repeated = counts + count_offset >= win_size * tau_r
    if fallback_logits is not None:
        full = fallback_logits.float().softmax(dim=-1)
    if redraw:
        p_rep = (nucleus * repeated).sum(dim=-1, keepdim=True)
        law = (1.0 - p_rep) * nucleus + p_rep * full
    elif exclude_repeated:
        rest = (1.0 - full).clamp_min(1e-20)
        share = torch.where(repeated, nucleus / rest, 0.0)
        law = nucleus * (~repeated) + full * (share.sum(dim=-1, keepdim=True) - share)
        # a repeated token holding all the mass: keep the nucleus draw
        law = torch.where(law.sum(dim=-1, keepdim=True) > 0, law, nucleus)
    else:
        p_rep = (nucleus * repeated).sum(dim=-1, keepdim=True)
        law = nucleus * (~repeated) + p_rep * full
    if banned is not None:
        law = law.masked_fill(banned, 0.0)
        # Nucleus of banned ids only: the original retries 100 times and
        # raises; draw from the rest of the full softmax instead.
        empty = law.sum(dim=-1, keepdim=True) <= 0
        law = torch.where(empty, full.masked_fill(banned, 0.0), law)
    return law


def sample_from(
    probs: torch.Tensor, generators: dict[int, torch.Generator]
) -> torch.Tensor:
    """One draw per row of (unnormalised) ``probs`` (exponential race, like
    vLLM's sampler; seeded rows use their own generator)."""
    q = torch.empty_like(probs)
    if len(generators) != probs.shape[0]:
        q.exponential_()
    for i, g in generators.items():
        if i < probs.shape[0]:
            q[i].exponential_(generator=g)
    return probs.div(q).argmax(dim=-1)


# --------------------------------------------------------------- model ----
class CosyVoice2ForCausalLM(nn.Module, SupportsSpeechGeneration, SupportsMultiCodebook):
    """CosyVoice2's ``Qwen2LM`` on a unified text + speech vocabulary."""

    supports_speech_generation_only = True
    supports_multi_codebook: ClassVar[Literal[True]] = True
    # llm.pt only (flow.pt / hift.pt are the API server's decoder)
    allow_patterns_overrides: ClassVar[list[str]] = ["llm.pt"]
    # What differs between the CosyVoice generations (see cosyvoice3.py).
    vocab_cls: ClassVar[type[CosyVoice2Vocab]] = CosyVoice2Vocab
    decoder_bias: ClassVar[bool] = True
    special_tokens: ClassVar[dict[str, Any]] = COSYVOICE2_SPECIAL_TOKENS
    speech_tokenizer_name: ClassVar[str] = SPEECH_TOKENIZER_NAME

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.vocab = self.vocab_cls(config)
        if int(config.vocab_size) != self.vocab.vocab_size:
            raise ValueError(
                f"{type(self).__name__}: vocab_size {config.vocab_size} != "
                f"unified size {self.vocab.vocab_size}"
            )
        sampling = dict(getattr(config, "cosyvoice_sampling", {}) or {})
        self.win_size = int(sampling.get("win_size", 10))
        self.tau_r = float(sampling.get("tau_r", 0.1))
        self.num_aux_codebooks = 0
        self.codebook_history_window = self.win_size
        quant_config = vllm_config.quant_config
        # One embedding table over the unified id space (see load_weights).
        self.model = Qwen2Model(
            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model")
        )
        self.llm_decoder = ParallelLMHead(
            self.vocab.num_speech_rows,
            config.hidden_size,
            bias=self.decoder_bias,
            quant_config=quant_config,
            prefix=maybe_prefix(prefix, "llm_decoder"),
        )
        self.logits_processor = LogitsProcessor(self.vocab.num_speech_rows)
        self.make_empty_intermediate_tensors = (
            self.model.make_empty_intermediate_tensors
        )

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

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_speech_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """``llm_decoder`` logits [N, num_speech_rows] (speech-token space)."""
        return self.logits_processor(
            self.llm_decoder, hidden_states, self.llm_decoder.bias
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        speech = self.compute_speech_logits(hidden_states)
        if speech is None:
            return None
        v = self.vocab
        logits = speech.new_full((speech.shape[0], v.vocab_size), float("-inf"))
        logits[:, v.speech_offset :] = speech
        return logits

    # ---- sampling (SupportsMultiCodebook hook, no aux codes) -------------
    def sample_codebooks(
        self,
        logits: torch.Tensor,
        hidden_states: torch.Tensor,
        sampling_metadata: SamplingMetadata,
        history: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.vocab
        rows = logits.shape[0]
        logits, banned = self._apply_logitsprocs(logits.float(), sampling_metadata)
        speech = logits[:, v.speech_offset :]
        hist = history[..., 0].to(logits.device).long()
        hist = torch.where(hist >= v.speech_offset, hist - v.speech_offset, -1)
        ids = self._sample_speech(speech, banned, hist, sampling_metadata)
        ids = ids.long() + v.speech_offset
        return ids, ids.new_zeros(rows, 0)

    def _apply_logitsprocs(
        self, logits: torch.Tensor, md: SamplingMetadata
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Apply the per-request logits processors (e.g. logit_bias) except
        min_tokens, whose stop-id mask [R, num_speech_rows] is returned
        instead (None when no row is below its minimum length)."""
        from vllm.v1.sample.logits_processor.builtin import (
            MinTokensLogitsProcessor,
        )

        banned = None
        for proc in md.logitsprocs.non_argmax_invariant:
            if isinstance(proc, MinTokensLogitsProcessor):
                if proc.min_toks:
                    mask = torch.zeros_like(logits, dtype=torch.bool)
                    mask.index_put_(
                        proc.logits_slice,
                        torch.ones((), dtype=torch.bool, device=logits.device),
                    )
                    banned = mask[:, self.vocab.speech_offset :]
                continue
            logits = proc.apply(logits)
        return logits, banned

    def _sample_speech(
        self,
        speech: torch.Tensor,
        banned: torch.Tensor | None,
        hist: torch.Tensor,
        md: SamplingMetadata,
    ) -> torch.Tensor:
        """Speech-token ids [R] from the speech logits. Below the minimum
        length, the stop ids are removed from the RAS law, which is what the
        original's retry-until-not-eos loop samples from. The original holds
        back only eos (id S); vLLM's min_tokens also holds back the other
        stop ids (S + 1, S + 2), which a trained model never emits."""
        return self._draw(speech, hist, md, banned=banned)

    def _draw(
        self,
        speech: torch.Tensor,
        hist: torch.Tensor,
        md: SamplingMetadata,
        banned: torch.Tensor | None = None,
        exclude_repeated: bool = False,
    ) -> torch.Tensor:
        """Greedy rows take the argmax (banned ids excluded); the others draw
        from the RAS law at their temperature, top-p and top-k. ``hist``
        [R, W] holds the recent tokens in speech-token space (-1 = none)."""
        rows = speech.shape[0]
        dev = speech.device
        masked = speech if banned is None else speech.masked_fill(banned, float("-inf"))
        if md.temperature is None or md.all_greedy:
            return masked.argmax(dim=-1)
        # No host sync: the greedy/random split comes from the metadata.
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
        scaled = speech / torch.where(greedy, 1.0, temperature)[:, None]
        law = ras_distribution(
            scaled,
            hist,
            top_p,
            top_k,
            self.win_size,
            self.tau_r,
            banned,
            exclude_repeated=exclude_repeated,
        )
        ids = sample_from(law, md.generators)
        if not md.all_random:
            ids = torch.where(greedy, masked.argmax(dim=-1), ids)
        return ids

    # ---- weights ---------------------------------------------------------
    def _embedding_tables(self) -> dict[str, int]:
        """The ``llm.pt`` tables stacked (in this order) into the unified
        embedding, with their row counts."""
        v = self.vocab
        return {
            "llm.model.model.embed_tokens.weight": v.text_vocab_size,
            "llm_embedding.weight": 2,
            "speech_embedding.weight": v.num_speech_rows,
        }

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """``llm.pt`` as ``Qwen2LM.state_dict()`` saves it: the text
        ``embed_tokens``, ``llm_embedding`` and ``speech_embedding`` rows are
        stacked into the unified table; the tied ``llm.model.lm_head`` copy
        is unused."""
        parts: dict[str, torch.Tensor] = {}
        expected_rows = self._embedding_tables()
        loaded: set[str] = set()
        params = dict(self.named_parameters())

        def backbone() -> Iterable[tuple[str, torch.Tensor]]:
            for name, w in weights:
                if name in expected_rows:
                    if w.shape[0] != expected_rows[name]:
                        raise ValueError(
                            f"llm.pt: {name} has {w.shape[0]} rows, expected "
                            f"{expected_rows[name]}"
                        )
                    parts[name] = w
                elif name.startswith("llm.model.lm_head."):
                    continue
                elif name.startswith("llm_decoder.") and name in params:
                    param = params[name]
                    loader = getattr(param, "weight_loader", None)
                    if loader is None:
                        param.data.copy_(w)
                    else:
                        loader(param, w)
                    loaded.add(name)
                elif name.startswith("llm.model.model."):
                    yield name[len("llm.model.model.") :], w
                else:
                    raise ValueError(f"llm.pt: unexpected tensor {name}")
            if len(parts) == len(expected_rows):
                table = torch.cat([parts[k] for k in expected_rows], dim=0)
                yield "embed_tokens.weight", table
            else:
                missing = sorted(set(expected_rows) - set(parts))
                raise ValueError(f"llm.pt: missing {missing}")

        loaded |= {f"model.{n}" for n in self.model.load_weights(backbone())}
        missing = sorted(
            n for n in params if n.startswith("llm_decoder.") and n not in loaded
        )
        if missing:
            raise ValueError(f"llm.pt: missing {missing}")
        return loaded

    # ---- speech generation glue -----------------------------------------
    @classmethod
    def get_speech_config(cls, model_config: ModelConfig) -> TextToSpeechConfig:
        from vllm.config.text_to_speech import TextToSpeechConfig

        hf = model_config.hf_config
        sampling = dict(getattr(hf, "cosyvoice_sampling", {}) or {})
        model_dir = model_config.model
        cloning = all(
            os.path.isfile(os.path.join(model_dir, n))
            for n in (CAMPPLUS_NAME, cls.speech_tokenizer_name)
        )
        return TextToSpeechConfig(
            sample_rate=int(getattr(hf, "cosyvoice_sample_rate", 24000)),
            frame_rate=float(getattr(hf, "cosyvoice_token_frame_rate", 25)),
            max_input_chars=4096,
            max_ref_audio_s=30.0,  # the speech tokenizer's limit
            ref_audio_sample_rate=16000,
            default_max_new_tokens=model_config.max_model_len,
            supports_voice_cloning=cloning,
            default_sampling={
                "temperature": 1.0,
                "top_p": float(sampling.get("top_p", 0.8)),
                "top_k": int(sampling.get("top_k", 25)),
            },
        )

    @classmethod
    def get_speech_presets(cls, model_config: ModelConfig) -> list[str]:
        return list(_load_spk2info(model_config.model))

    @classmethod
    def _text_ids(cls, model_config: ModelConfig, text: str) -> list[int]:
        return cls._tokenizer(model_config).encode(text, add_special_tokens=False)

    @classmethod
    def _tokenizer(cls, model_config: ModelConfig) -> _CosyVoice2Tokenizer:
        return get_cosyvoice2_tokenizer(
            _qwen_dir(model_config.model), _freeze(cls.special_tokens)
        )

    @classmethod
    def _instruct_prompt_text(cls, instruct: str) -> str:
        """The prompt text of instruct2 mode for an instruction."""
        return instruct + ENDOFPROMPT

    @classmethod
    def _lm_prompt_text(
        cls, model_config: ModelConfig, prompt_text_ids: list[int], text_ids: list[int]
    ) -> list[int]:
        """The prompt text ids that go before the text (CosyVoice2: as is)."""
        return prompt_text_ids

    @classmethod
    def split_speech_text(cls, params: TextToSpeechParams) -> list[str]:
        """The original frontend's ``text_normalize(text, split=True)``
        without ttsfrd / wetext (``cosyvoice_frontend.py``): light clean-up,
        then segments at sentence marks, each its own LM run."""
        from vllm.model_executor.models.cosyvoice_frontend import split_request_text

        mc = params.model_config
        return split_request_text(
            params.text, lambda t: len(cls._text_ids(mc, t)), params.extra
        )

    @classmethod
    def get_speech_generation_prompt(cls, params: TextToSpeechParams) -> Any:
        from vllm.inputs import TokensPrompt

        mc = params.model_config
        vocab = cls.vocab_cls(mc.hf_config)
        voice, prompt_text_ids, prompt_speech = _resolve_voice(cls, params)
        text_ids = cls._text_ids(mc, params.text)
        if not text_ids:
            raise ValueError("the input text has no tokens")
        prompt_text_ids = cls._lm_prompt_text(mc, list(prompt_text_ids), text_ids)
        ids = (
            [vocab.sos]
            + list(prompt_text_ids)
            + text_ids
            + [vocab.task_id]
            + vocab.speech_ids(prompt_speech)
        )
        params.voice = voice  # the decoder conditions on the resolved voice
        return TokensPrompt(prompt_token_ids=ids)

    @classmethod
    def get_speech_sampling_params(
        cls, params: TextToSpeechParams, sampling_kwargs: dict[str, Any]
    ) -> SamplingParams:
        from vllm.sampling_params import SamplingParams

        mc = params.model_config
        hf = mc.hf_config
        vocab = cls.vocab_cls(hf)
        n_text = len(cls._text_ids(mc, params.text))
        min_len = int(n_text * float(getattr(hf, "cosyvoice_min_token_text_ratio", 2)))
        max_len = int(n_text * float(getattr(hf, "cosyvoice_max_token_text_ratio", 20)))
        kwargs = dict(sampling_kwargs)
        max_tokens = max(
            1, min(int(kwargs.pop("max_tokens", max_len) or max_len), max_len)
        )
        # The request's EOS (the tokenizer's) is a text id: never sampled.
        return SamplingParams(
            **kwargs,
            max_tokens=max_tokens,
            min_tokens=min(min_len, max_tokens),
            stop_token_ids=list(vocab.stop_token_ids),
            detokenize=False,
            skip_special_tokens=False,
        )

    @classmethod
    def get_speech_frames(
        cls, output: CompletionOutput, model_config: ModelConfig
    ) -> np.ndarray:
        vocab = cls.vocab_cls(model_config.hf_config)
        return vocab.frames(output.token_ids).reshape(-1, 1)

    @classmethod
    def get_speech_decoder(
        cls, model_config: ModelConfig, device: torch.device
    ) -> CosyVoice2SpeechDecoder:
        return CosyVoice2SpeechDecoder(model_config.model, device)


# --------------------------------------------------------------- helpers ----
def _qwen_dir(model_dir: str) -> str:
    return os.path.join(model_dir, QWEN_DIR_NAME)


class _CosyVoice2Tokenizer:
    """The original ``QwenTokenizer`` (the generation's specials added)."""

    def __init__(self, path: str, special_tokens: dict[str, Any] | None = None):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.add_special_tokens(
            COSYVOICE2_SPECIAL_TOKENS if special_tokens is None else special_tokens
        )
        self._lock = threading.Lock()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        with self._lock:
            return list(self.tokenizer([text])["input_ids"][0])

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.convert_tokens_to_ids(token)


def _freeze(specials: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in specials.items()
    )


@lru_cache(maxsize=8)
def get_cosyvoice2_tokenizer(
    path: str, special_tokens: tuple[tuple[str, Any], ...] | None = None
) -> _CosyVoice2Tokenizer:
    specials = (
        None
        if special_tokens is None
        else {k: list(v) if isinstance(v, tuple) else v for k, v in special_tokens}
    )
    return _CosyVoice2Tokenizer(path, specials)


@lru_cache(maxsize=8)
def _load_spk2info(model_dir: str) -> dict[str, dict[str, Any]]:
    path = os.path.join(model_dir, SPK2INFO_NAME)
    if not os.path.isfile(path):
        return {}
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of speakers")
    return data


def _flat_ints(x: Any) -> list[int]:
    if x is None:
        return []
    return [int(t) for t in torch.as_tensor(x).reshape(-1).tolist()]


def _spk_voice(model_dir: str, name: str) -> tuple[VoicePrompt, list[int], list[int]]:
    """A ``spk2info.pt`` speaker as (voice for the decoder, LM prompt text
    ids, LM prompt speech tokens). Entries saved by ``add_zero_shot_spk``
    hold the zero-shot model input; SFT entries only an ``embedding``."""
    from vllm.config.text_to_speech import VoicePrompt

    info = _load_spk2info(model_dir)[name]
    emb = info.get("flow_embedding", info.get("embedding"))
    extra: dict[str, Any] = {}
    if emb is not None:
        extra["embedding"] = torch.as_tensor(emb).float().reshape(-1).numpy()
    flow_tokens = _flat_ints(info.get("flow_prompt_speech_token"))
    feat = info.get("prompt_speech_feat")
    if feat is not None and flow_tokens:
        extra["prompt_feat"] = torch.as_tensor(feat).float().reshape(-1, 80).numpy()
    voice = VoicePrompt(
        ref_text="",
        codes=np.asarray(flow_tokens, np.int64) if flow_tokens else None,
        extra=extra,
        name=name,
    )
    return (
        voice,
        _flat_ints(info.get("prompt_text")),
        _flat_ints(info.get("llm_prompt_speech_token")),
    )


def _resolve_voice(
    cls: type[CosyVoice2ForCausalLM], params: TextToSpeechParams
) -> tuple[VoicePrompt | None, list[int], list[int]]:
    """Prompt layout of the original frontend modes:

    * zero_shot (default with a voice): prompt text + its speech tokens;
    * ``extra_args.mode = "cross_lingual"``: neither (the flow keeps the voice);
    * ``extra_args.instruct_text`` (instruct2): the instruction as the
      prompt text (``cls._instruct_prompt_text``), no prompt speech tokens.
    """
    mc = params.model_config
    extra = params.extra or {}
    mode = extra.get("mode", "zero_shot")
    if mode not in ("zero_shot", "cross_lingual", "instruct2"):
        raise ValueError(
            f"unknown mode {mode!r}; use zero_shot, cross_lingual or instruct2"
        )
    instruct = extra.get("instruct_text")
    if instruct is not None and not isinstance(instruct, str):
        raise ValueError("instruct_text must be a string")
    if instruct:
        mode = "instruct2"
    voice = params.voice
    prompt_text: list[int] = []
    prompt_speech: list[int] = []
    if voice is None and params.speaker is not None:
        voice, prompt_text, prompt_speech = _spk_voice(mc.model, params.speaker)
    elif voice is not None:
        if voice.ref_text:
            from vllm.model_executor.models.cosyvoice_frontend import (
                normalize_prompt_text,
            )

            ref_text = normalize_prompt_text(voice.ref_text, extra)
            prompt_text = cls._text_ids(mc, ref_text)
        prompt_speech = _flat_ints(voice.codes)
    size = int(mc.hf_config.cosyvoice_speech_token_size)
    if any(t < 0 or t >= size for t in prompt_speech):
        raise ValueError(f"voice speech tokens must lie in [0, {size})")
    if mode == "cross_lingual":
        prompt_text, prompt_speech = [], []
    elif mode == "instruct2":
        if not instruct:
            raise ValueError("mode instruct2 needs extra_args.instruct_text")
        prompt_text = cls._text_ids(mc, cls._instruct_prompt_text(instruct))
        prompt_speech = []
    return voice, prompt_text, prompt_speech


# --------------------------------------------------------------- decoder ----
class CosyVoice2SpeechDecoder:
    """Speech tokens -> 24 kHz audio with the release's flow + HiFT, in the
    API server process. A voice conditions the flow with its prompt tokens,
    prompt mel and x-vector; without one the flow gets no prompt and a zero
    speaker embedding."""

    # reference encoding: the release's speech tokenizer, prompt-mel fmax
    speech_tokenizer_name = SPEECH_TOKENIZER_NAME
    mel_fmax: float | None = 8000.0

    def __init__(self, model_dir: str, device: torch.device, token2wav_cls: Any = None):
        if token2wav_cls is None:
            from vllm.model_executor.models.cosyvoice_token2wav import (
                CosyVoice2Token2Wav as token2wav_cls,
            )

        self.model_dir = model_dir
        self.device = torch.device(device)
        self.t2w = token2wav_cls.from_pretrained(model_dir, device=self.device)
        self.sample_rate = self.t2w.sample_rate
        self.samples_per_frame = self.t2w.samples_per_token
        self.spk_embed_dim = int(self.t2w.flow.config.spk_embed_dim)
        # Streaming: hand every new token to the session, which decodes as
        # soon as a hop (25 tokens, + prompt padding) and the look-ahead are
        # there, as the original's stream loop does.
        self.stream_chunk_frames = (1, 1)
        self._frontend: CosyVoice2Frontend | None = None

    def _condition(
        self, voice: VoicePrompt | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = self.device
        tokens = torch.zeros(1, 0, dtype=torch.int32, device=dev)
        feat = torch.zeros(1, 0, 80, device=dev)
        emb = torch.zeros(1, self.spk_embed_dim, device=dev)
        if voice is None:
            return tokens, feat, emb
        extra = voice.extra or {}
        if extra.get("embedding") is not None:
            emb = torch.as_tensor(np.asarray(extra["embedding"]), dtype=torch.float32)
            emb = emb.reshape(1, -1).to(dev)
        if voice.codes is not None and extra.get("prompt_feat") is not None:
            tokens = torch.as_tensor(np.asarray(voice.codes).reshape(1, -1))
            tokens = tokens.to(dev, torch.int32)
            feat = torch.as_tensor(
                np.asarray(extra["prompt_feat"]), dtype=torch.float32
            )
            feat = feat.reshape(1, -1, 80).to(dev)
        return tokens, feat, emb

    def decode(
        self, frames: list[np.ndarray], voices: list[VoicePrompt | None] | None = None
    ) -> list[np.ndarray]:
        voices = list(voices) if voices is not None else [None] * len(frames)
        out: list[np.ndarray | None] = [None] * len(frames)
        idx = [i for i, f in enumerate(frames) if len(f) > 0]
        for i, f in enumerate(frames):
            if len(f) == 0:
                out[i] = np.zeros(0, np.float32)
        if idx:
            conds = [self._condition(voices[i]) for i in idx]
            tokens = [
                torch.as_tensor(np.asarray(frames[i]).reshape(1, -1)).to(
                    self.device, torch.int32
                )
                for i in idx
            ]
            with torch.inference_mode():
                wavs = self.t2w.synthesize_batch(
                    tokens,
                    [c[0] for c in conds],
                    [c[1] for c in conds],
                    torch.cat([c[2] for c in conds], dim=0),
                    generators=[self._generator() for _ in idx],
                )
            for i, w in zip(idx, wavs):
                out[i] = w.reshape(-1).float().cpu().numpy()
        return [o for o in out]  # type: ignore[misc]

    def open_stream(self, voice: VoicePrompt | None = None) -> CosyVoice2DecoderStream:
        tokens, feat, emb = self._condition(voice)
        return CosyVoice2DecoderStream(
            self.t2w.stream(tokens, feat, emb, generator=self._generator())
        )

    def decode_streams(
        self,
        sessions: list[CosyVoice2DecoderStream],
        frames: list[np.ndarray | None],
    ) -> list[np.ndarray | BaseException]:
        """One round of ``decode`` (or ``finish``, where ``frames`` is None)
        on several sessions: each gets its frames and decodes at most one
        chunk, the chunks batched (``push_streams``); a session with more
        ready chunks says so in ``has_work`` and is called again (with no
        new frames). Returns each session's audio, or the exception that
        stopped it."""
        from vllm.model_executor.models.cosyvoice_token2wav import push_streams

        out: list[np.ndarray | BaseException] = [
            np.zeros(0, np.float32) for _ in sessions
        ]
        for s, f in zip(sessions, frames):
            s.finishing = s.finishing or f is None
        idx = [
            i
            for i, (s, f) in enumerate(zip(sessions, frames))
            if not (f is None and s.stream.finished)
        ]
        with torch.inference_mode():
            results = push_streams(
                [sessions[i].stream for i in idx],
                [
                    []
                    if frames[i] is None
                    else np.asarray(frames[i]).reshape(-1).tolist()
                    for i in idx
                ],
                [frames[i] is None for i in idx],
                max_rounds=1,
            )
        for i, r in zip(idx, results):
            if isinstance(r, BaseException):
                sessions[i].failed = True
                out[i] = r
            else:
                out[i] = sessions[i]._cat(r)
        return out

    def _generator(self) -> torch.Generator:
        """HiFT's excitation noise, seeded per utterance: the same tokens
        give the same audio (the original draws from the global RNG)."""
        return torch.Generator(device=self.device).manual_seed(0)

    def encode_reference(
        self, audio: np.ndarray, sample_rate: int, ref_text: str
    ) -> VoicePrompt:
        if self._frontend is None:
            self._frontend = CosyVoice2Frontend(
                self.model_dir, self.speech_tokenizer_name, self.mel_fmax
            )
        return self._frontend.encode(audio, sample_rate, ref_text)


class CosyVoice2DecoderStream:
    """Streaming session: the original's chunked token2wav (token hop 25,
    look-ahead, HiFT cache and cross-fade). ``finish`` returns the audio held
    back for the look-ahead / cross-fade once generation has ended."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.finishing = False  # finish was asked for (decode_streams)
        self.failed = False

    @property
    def has_work(self) -> bool:
        """``decode_streams`` left chunks to decode (it does one per call)."""
        return not self.failed and self.stream.has_work(self.finishing)

    @staticmethod
    def _cat(chunks: list[torch.Tensor]) -> np.ndarray:
        if not chunks:
            return np.zeros(0, np.float32)
        return torch.cat([c.reshape(-1) for c in chunks]).float().cpu().numpy()

    def decode(self, frames: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self._cat(self.stream.push(np.asarray(frames).reshape(-1).tolist()))

    def finish(self) -> np.ndarray:
        if self.stream.finished:
            return np.zeros(0, np.float32)
        with torch.inference_mode():
            return self._cat(self.stream.finish())


# ---------------------------------------------------- reference encoding ----
class CosyVoice2Frontend:
    """Zero-shot reference encoding of the original frontend
    (``frontend_zero_shot``): speech tokens from ``speech_tokenizer_v2.onnx``
    (``_v3`` for CosyVoice3; whisper log-mel, 128 bins, 16 kHz), the CAM++
    x-vector from ``campplus.onnx`` (kaldi fbank, 80 bins, mean-normalised)
    and the 24 kHz prompt mel of the flow (trimmed to 2 frames per token;
    fmax 8000 for CosyVoice2, none for CosyVoice3). Needs ``onnxruntime``."""

    def __init__(
        self,
        model_dir: str,
        speech_tokenizer_name: str = SPEECH_TOKENIZER_NAME,
        mel_fmax: float | None = 8000.0,
    ):
        try:
            import onnxruntime
        except ImportError as e:
            raise ValueError(
                "zero-shot voice cloning with CosyVoice needs onnxruntime "
                "(pip install onnxruntime) to run campplus.onnx and "
                f"{speech_tokenizer_name}"
            ) from e
        self.mel_fmax = mel_fmax
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = 1
        self.campplus = onnxruntime.InferenceSession(
            os.path.join(model_dir, CAMPPLUS_NAME),
            sess_options=opts,
            providers=["CPUExecutionProvider"],
        )
        self.tokenizer = onnxruntime.InferenceSession(
            os.path.join(model_dir, speech_tokenizer_name),
            sess_options=opts,
            providers=["CPUExecutionProvider"],
        )

    def encode(self, audio: np.ndarray, sample_rate: int, ref_text: str) -> VoicePrompt:
        import torchaudio

        from vllm.config.text_to_speech import VoicePrompt

        if sample_rate != 16000:
            raise ValueError("CosyVoice reference audio must be 16 kHz")
        speech = torch.as_tensor(np.asarray(audio, np.float32)).reshape(1, -1)
        if speech.shape[1] > 30 * 16000:
            raise ValueError("reference audio longer than 30 s is not supported")
        # speech tokens (25 Hz)
        feat = whisper_log_mel(speech[0], n_mels=128)[None]
        inputs = self.tokenizer.get_inputs()
        tokens = (
            self.tokenizer.run(
                None,
                {
                    inputs[0].name: feat.numpy(),
                    inputs[1].name: np.array([feat.shape[2]], dtype=np.int32),
                },
            )[0]
            .reshape(-1)
            .astype(np.int64)
        )
        # x-vector
        fb = torchaudio.compliance.kaldi.fbank(
            speech, num_mel_bins=80, dither=0, sample_frequency=16000
        )
        fb = fb - fb.mean(dim=0, keepdim=True)
        emb = (
            self.campplus.run(
                None, {self.campplus.get_inputs()[0].name: fb[None].numpy()}
            )[0]
            .reshape(-1)
            .astype(np.float32)
        )
        # prompt mel at 24 kHz, 2 frames per token
        speech24 = torchaudio.functional.resample(speech, 16000, 24000)
        mel = matcha_mel(speech24, fmax=self.mel_fmax)[0].transpose(0, 1)  # [T, 80]
        n = min(mel.shape[0] // 2, len(tokens))
        return VoicePrompt(
            ref_text=ref_text,
            codes=tokens[:n],
            extra={"prompt_feat": mel[: 2 * n].numpy(), "embedding": emb},
        )


def slaney_mel_filters(
    sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> torch.Tensor:
    """``librosa.filters.mel`` (slaney scale and norm) as [n_mels, n_fft//2+1]."""
    import torchaudio

    return torchaudio.functional.melscale_fbanks(
        n_fft // 2 + 1,
        fmin,
        fmax if fmax is not None else sr / 2,
        n_mels,
        sr,
        norm="slaney",
        mel_scale="slaney",
    ).T.contiguous()


def whisper_log_mel(audio: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """``whisper.log_mel_spectrogram`` (n_fft 400, hop 160, slaney mel)."""
    window = torch.hann_window(400)
    stft = torch.stft(audio, 400, 160, window=window, return_complex=True)
    mag = stft[..., :-1].abs() ** 2
    filters = slaney_mel_filters(16000, 400, n_mels)
    log_spec = torch.clamp(filters @ mag, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def matcha_mel(
    y: torch.Tensor,
    n_fft: int = 1920,
    hop: int = 480,
    win: int = 1920,
    n_mels: int = 80,
    sr: int = 24000,
    fmin: float = 0.0,
    fmax: float | None = 8000.0,
) -> torch.Tensor:
    """``matcha.utils.audio.mel_spectrogram`` with CosyVoice2's parameters
    (``fmax=None``: up to sr / 2, as CosyVoice3's yaml sets it)."""
    mel_basis = slaney_mel_filters(sr, n_fft, n_mels, fmin, fmax)
    pad = (n_fft - hop) // 2
    y = torch.nn.functional.pad(y[:, None], (pad, pad), mode="reflect")[:, 0]
    spec = torch.stft(
        y,
        n_fft,
        hop_length=hop,
        win_length=win,
        window=torch.hann_window(win),
        center=False,
        pad_mode="reflect",
        normalized=False,
        onesided=True,
        return_complex=True,
    )
    spec = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
    return torch.log(torch.clamp(mel_basis @ spec, min=1e-5))


__all__ = ["CosyVoice2ForCausalLM"]
