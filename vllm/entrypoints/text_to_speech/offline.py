# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Offline text to speech, beside ``LLM``.

    from vllm.entrypoints.text_to_speech.offline import SpeechSynthesizer

    tts = SpeechSynthesizer("/path/to/openaudio-s1-mini")
    voice = tts.encode_voice("ref.wav", "transcript of ref.wav")
    outs = tts.synthesize(["Hello.", "Second sentence."], voice=voice)
    outs[0].audio, outs[0].sample_rate

All texts of one call are generated as one batch by the engine; the decoder
runs in this process. A model may speak a text as several segments
(``split_speech_text``, e.g. CosyVoice's sentence splitting): each is its own
engine request in that batch, and the text's audio is their concatenation.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from vllm.config.text_to_speech import TextToSpeechParams, VoicePrompt
from vllm.entrypoints.text_to_speech.audio import change_tempo, load_reference_audio
from vllm.entrypoints.text_to_speech.protocol import SPEED_MAX, SPEED_MIN
from vllm.entrypoints.text_to_speech.segments import split_speech_request
from vllm.model_executor.models.interfaces import (
    SupportsSpeechGeneration,
    supports_speech_generation,
)


@dataclass
class SpeechOutput:
    text: str
    audio: np.ndarray
    """float32 mono waveform."""
    sample_rate: int
    frames: np.ndarray
    """The generated frames the audio was decoded from (of all segments,
    in order)."""
    segments: list[str] = field(default_factory=list)
    """The texts spoken one after another (the model's ``split_speech_text``;
    one for models that do not split)."""


class SpeechSynthesizer:
    """Synthesize lists of texts to waveforms with a speech model."""

    def __init__(
        self, model: str, *, decode_device: str | None = None, **llm_kwargs: Any
    ):
        from vllm import LLM
        from vllm.model_executor.model_loader import get_model_cls

        self.llm = LLM(model=model, **llm_kwargs)
        self.model_config = self.llm.llm_engine.model_config
        model_cls = get_model_cls(self.model_config)
        if not supports_speech_generation(model_cls):
            raise ValueError(
                f"{model!r} ({model_cls.__name__}) is not a speech generation model"
            )
        self.model_cls = cast(type[SupportsSpeechGeneration], model_cls)
        self.config = self.model_cls.get_speech_config(self.model_config)
        device = (
            torch.device(decode_device)
            if decode_device
            else (
                torch.device("cuda")
                if torch.cuda.is_available()
                else torch.device("cpu")
            )
        )
        self.decoder = self.model_cls.get_speech_decoder(self.model_config, device)

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def encode_voice(
        self,
        ref_audio: str | Path | np.ndarray,
        ref_text: str,
        sample_rate: int | None = None,
    ) -> VoicePrompt:
        """Encode reference audio (a file or a float waveform with its
        ``sample_rate``) and its transcript into a reusable voice."""
        if not self.config.supports_voice_cloning:
            raise ValueError("this model does not support voice cloning")
        if not ref_text or not ref_text.strip():
            raise ValueError("ref_text (the transcript of ref_audio) is required")
        target = self.config.ref_audio_sample_rate or self.config.sample_rate
        if isinstance(ref_audio, np.ndarray):
            if sample_rate is None:
                raise ValueError("sample_rate is required with a waveform")
            import io

            import soundfile

            buf = io.BytesIO()
            soundfile.write(
                buf, ref_audio.astype(np.float32), sample_rate, format="WAV"
            )
            data = buf.getvalue()
        else:
            data = Path(ref_audio).read_bytes()
        audio = load_reference_audio(data, target, self.config.max_ref_audio_s)
        with torch.inference_mode():
            return self.decoder.encode_reference(audio, target, ref_text.strip())

    def synthesize(
        self,
        texts: str | list[str],
        *,
        voice: VoicePrompt | None = None,
        speaker: str | None = None,
        voices: list[VoicePrompt | str] | None = None,
        speed: float = 1.0,
        max_new_tokens: int | None = None,
        extra_args: dict[str, Any] | None = None,
        use_tqdm: bool = False,
        **sampling: Any,
    ) -> list[SpeechOutput]:
        """Generate speech for each text. ``sampling``: temperature, top_p,
        top_k, repetition_penalty, seed (model defaults otherwise).
        ``voices``: multi-speaker models, one voice (encoded, or a preset
        name) per speaker of the script."""
        if isinstance(texts, str):
            texts = [texts]
        if not (SPEED_MIN <= speed <= SPEED_MAX):
            raise ValueError(f"speed must be in [{SPEED_MIN}, {SPEED_MAX}]")
        unknown = set(sampling) - {
            "temperature",
            "top_p",
            "top_k",
            "repetition_penalty",
            "seed",
        }
        if unknown:
            raise TypeError(f"unknown sampling options: {sorted(unknown)}")
        params_list, requests = [], []
        owners: list[int] = []  # text index of each segment
        # (text index, prompt, sampling) of the model's prelude requests
        preludes: list[tuple[int, Any, Any]] = []
        get_prelude = getattr(self.model_cls, "get_speech_prelude", None)
        for index, text in enumerate(texts):
            if not text or not text.strip():
                raise ValueError("texts must not be empty")
            if len(text) > self.config.max_input_chars:
                raise ValueError(
                    f"text of {len(text)} characters exceeds the "
                    f"limit of {self.config.max_input_chars}"
                )
            params = TextToSpeechParams(
                text=text.strip(),
                model_config=self.model_config,
                voice=voice,
                speaker=speaker,
                extra=dict(extra_args or {}),
                voices=list(voices) if voices else None,
            )
            kwargs = dict(self.config.default_sampling)
            kwargs.update({k: v for k, v in sampling.items() if v is not None})
            kwargs["max_tokens"] = max_new_tokens or self.config.default_max_new_tokens
            segs = split_speech_request(self.model_cls, params)
            if get_prelude is not None:
                preludes += [
                    (index, prompt, sp)
                    for prompt, sp in get_prelude(params, dict(kwargs))
                ]
            for seg in segs:
                params_list.append(
                    self.model_cls.get_speech_sampling_params(seg, dict(kwargs))
                )
                requests.append(seg)
                owners.append(index)
        if getattr(self.model_cls, "speech_segments_in_context", False):
            outputs = self._generate_in_context(
                requests, owners, params_list, use_tqdm, preludes
            )
        else:
            if preludes:
                raise RuntimeError(
                    "get_speech_prelude needs speech_segments_in_context"
                )
            prompts = [
                self.model_cls.get_speech_generation_prompt(seg) for seg in requests
            ]
            outputs = self.llm.generate(prompts, params_list, use_tqdm=use_tqdm)
        frames = [
            self.model_cls.get_speech_frames(o.outputs[0], self.model_config)
            for o in outputs
        ]
        with torch.inference_mode():
            nonempty = [f for f in frames if len(f)]
            # The prompt hook may resolve the voice (e.g. a preset speaker
            # whose prompt conditions the decoder too).
            voices = [p.voice for p, f in zip(requests, frames) if len(f)]
            decoded = iter(self.decoder.decode(nonempty, voices) if nonempty else [])
        # per segment, tempo changed per segment (as the original's speed)
        audios = []
        for f in frames:
            audio = (
                np.asarray(next(decoded), np.float32)
                if len(f)
                else np.zeros(0, np.float32)
            )
            audios.append(change_tempo(audio, speed, self.sample_rate))
        results = []
        for index, text in enumerate(texts):
            mine = [i for i, o in enumerate(owners) if o == index]
            results.append(
                SpeechOutput(
                    text,
                    np.concatenate([audios[i] for i in mine]),
                    self.sample_rate,
                    np.concatenate([frames[i] for i in mine]),
                    [requests[i].text for i in mine],
                )
            )
        return results

    def _generate_in_context(
        self,
        requests: list[TextToSpeechParams],
        owners: list[int],
        params_list: list[Any],
        use_tqdm: bool,
        preludes: list[tuple[int, Any, Any]] = (),
    ) -> list[Any]:
        """Segments spoken in context (``speech_segments_in_context``): the
        n-th segments of all texts are generated together, each prompt
        holding its text's earlier segments and their generated tokens.
        The texts' prelude requests (``get_speech_prelude``) come first, all
        together; their tokens go to the texts' segments
        (``TextToSpeechParams.prelude``)."""
        if preludes:
            outs = self.llm.generate(
                [pr for _, pr, _ in preludes],
                [sp for _, _, sp in preludes],
                use_tqdm=use_tqdm,
            )
            ids: dict[int, list[list[int]]] = {}
            for (owner, _, _), out in zip(preludes, outs):
                ids.setdefault(owner, []).append(list(out.outputs[0].token_ids))
            for req, owner in zip(requests, owners):
                req.prelude = ids.get(owner, [])
        outputs: list[Any] = [None] * len(requests)
        done: dict[int, list[int]] = {}  # text index -> its segments so far
        pending = list(range(len(requests)))
        while pending:
            batch, later, seen = [], [], set()
            for i in pending:
                (later if owners[i] in seen else batch).append(i)
                seen.add(owners[i])
            for i in batch:
                requests[i].context = [
                    (requests[j].text, list(outputs[j].outputs[0].token_ids))
                    for j in done.get(owners[i], [])
                ]
            prompts = [
                self.model_cls.get_speech_generation_prompt(requests[i]) for i in batch
            ]
            outs = self.llm.generate(
                prompts, [params_list[i] for i in batch], use_tqdm=use_tqdm
            )
            for i, out in zip(batch, outs):
                outputs[i] = out
                done.setdefault(owners[i], []).append(i)
            pending = later
        return outputs
