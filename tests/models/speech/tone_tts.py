# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""A test-only speech model for the generic ``/v1/audio/speech`` layer.

``ToneTTSForCausalLM`` is a Qwen2 language model that declares
``SupportsSpeechGeneration``: every generated token is one 20 ms frame whose
tone frequency comes from the token id. Its decoder is causal with a one-frame
receptive field (each frame cross-fades from the previous frame's tone), so a
chunked decode with ``stream_left_context = 1`` must equal the one-shot
decode exactly. Reference audio is "encoded" into per-frame loudness levels
that enter the prompt, so cloning visibly changes the generation.

Served with ``--model-class-overrides '{"Qwen2ForCausalLM":
"tone_tts:ToneTTSForCausalLM"}'`` and this directory on PYTHONPATH.
"""

from typing import Any

import numpy as np
import torch

from vllm.config.text_to_speech import (
    TextToSpeechConfig,
    TextToSpeechParams,
    VoicePrompt,
)
from vllm.inputs import TokensPrompt
from vllm.model_executor.models.interfaces import SupportsSpeechGeneration
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.sampling_params import SamplingParams

SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = 320  # 20 ms
FADE = 80


def token_frequency(token_id: int) -> float:
    return 200.0 + (int(token_id) % 64) * 25.0


class ToneDecoder:
    sample_rate = SAMPLE_RATE
    samples_per_frame = SAMPLES_PER_FRAME
    stream_left_context = 1

    def __init__(self, device: torch.device):
        self.device = device
        self.calls: list[int] = []  # batch sizes seen (batching check)

    def _frame(self, token_id: int, n: np.ndarray) -> np.ndarray:
        return 0.3 * np.sin(2 * np.pi * token_frequency(token_id) * n / SAMPLE_RATE)

    def decode(self, frames: list[np.ndarray], voices=None) -> list[np.ndarray]:
        self.calls.append(len(frames))
        out = []
        n = np.arange(SAMPLES_PER_FRAME, dtype=np.float64)
        ramp = np.clip(n / FADE, 0.0, 1.0)
        for f in frames:
            ids = np.asarray(f).reshape(len(f), -1)[:, 0]
            chunks = []
            for t, tok in enumerate(ids):
                cur = self._frame(tok, n)
                if t > 0:  # cross-fade from the previous frame's tone
                    prev = self._frame(ids[t - 1], n + SAMPLES_PER_FRAME)
                    cur = ramp * cur + (1 - ramp) * prev
                chunks.append(cur)
            audio = np.concatenate(chunks) if chunks else np.zeros(0)
            out.append(audio.astype(np.float32))
        return out

    def open_stream(self, voice=None):
        from vllm.entrypoints.text_to_speech.serving import LeftContextStream

        return LeftContextStream(self, voice)

    def encode_reference(
        self, audio: np.ndarray, sample_rate: int, ref_text: str
    ) -> VoicePrompt:
        assert sample_rate == SAMPLE_RATE
        n = len(audio) // SAMPLES_PER_FRAME
        frames = audio[: n * SAMPLES_PER_FRAME].reshape(n, SAMPLES_PER_FRAME)
        rms = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1))
        levels = np.clip((rms * 40).astype(np.int64), 0, 15)
        return VoicePrompt(ref_text=ref_text, codes=levels)


class ToneTTSForCausalLM(Qwen2ForCausalLM, SupportsSpeechGeneration):
    supports_speech_generation_only = True

    @classmethod
    def get_speech_config(cls, model_config) -> TextToSpeechConfig:
        return TextToSpeechConfig(
            sample_rate=SAMPLE_RATE,
            frame_rate=SAMPLE_RATE / SAMPLES_PER_FRAME,
            max_input_chars=200,
            max_ref_audio_s=10.0,
            default_max_new_tokens=24,
            default_sampling={"temperature": 0.0},
        )

    @classmethod
    def get_speech_presets(cls, model_config) -> list[str]:
        return ["low"]

    @classmethod
    def get_speech_generation_prompt(cls, params: TextToSpeechParams):
        from vllm.tokenizers import get_tokenizer

        tok = get_tokenizer(params.model_config.tokenizer)
        ids: list[int] = []
        if params.voice is not None:
            ids += tok.encode(params.voice.ref_text)
            ids += [int(c) + 3 for c in params.voice.codes]  # past the specials
        if params.speaker == "low":
            ids += tok.encode("low")
        ids += tok.encode(params.text)
        return TokensPrompt(prompt_token_ids=ids)

    @classmethod
    def get_speech_sampling_params(
        cls, params: TextToSpeechParams, sampling_kwargs: dict[str, Any]
    ) -> SamplingParams:
        return SamplingParams(**sampling_kwargs, ignore_eos=True, detokenize=False)

    @classmethod
    def get_speech_frames(cls, output, model_config) -> np.ndarray:
        return np.asarray(output.token_ids, dtype=np.int64).reshape(-1, 1)

    @classmethod
    def get_speech_decoder(cls, model_config, device) -> ToneDecoder:
        return ToneDecoder(device)
