# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Configuration objects of the text-to-speech (``"speech"``) task.

A model implementing ``SupportsSpeechGeneration`` describes itself with a
``TextToSpeechConfig`` and receives its request as ``TextToSpeechParams``;
the serving layer (``vllm.entrypoints.text_to_speech``) and the offline API
only talk to models through these objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from vllm.config.model import ModelConfig


@dataclass(frozen=True)
class TextToSpeechConfig:
    """What a speech-generation model supports and needs."""

    sample_rate: int
    """Sample rate (Hz) of the waveform the model's decoder produces."""

    frame_rate: float
    """Generated frames (engine steps) per second of audio."""

    max_input_chars: int = 4096
    """Longest accepted input text, in characters."""

    max_ref_audio_s: float = 60.0
    """Longest accepted reference audio for zero-shot cloning, in seconds."""

    ref_audio_sample_rate: int | None = None
    """Rate the reference audio is resampled to before encoding (None: the
    output sample rate)."""

    default_max_new_tokens: int = 2048
    """Frames generated at most when the request does not say."""

    supports_voice_cloning: bool = True
    """Whether ``ref_audio`` / registered voices are accepted."""

    default_sampling: dict[str, Any] = field(default_factory=dict)
    """Per-model sampling defaults (temperature, top_p, ...), overridable
    per request."""


@dataclass
class VoicePrompt:
    """An encoded reference voice: what zero-shot cloning conditions on."""

    ref_text: str
    """Transcript of the reference audio."""

    codes: np.ndarray | None = None
    """Codec codes / speech tokens of the reference audio (model-specific
    shape, e.g. ``[num_codebooks, T]`` for Fish Speech)."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Model-specific conditioning (e.g. a speaker embedding)."""

    name: str | None = None
    """Registered voice name, if any."""


@dataclass
class TextToSpeechParams:
    """Everything ``get_speech_generation_prompt()`` consumes."""

    text: str
    """Text to speak (already validated: non-empty, within limits)."""

    model_config: ModelConfig
    """Model configuration."""

    voice: VoicePrompt | None = None
    """Reference voice for zero-shot cloning, or None for the default."""

    speaker: str | None = None
    """Model-specific preset speaker/voice id that needs no reference audio."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Model-specific request options (``extra_body`` fields)."""

    voices: list[VoicePrompt | str] | None = None
    """Multi-speaker models: one voice per speaker, in speaker order (an
    encoded voice, or the name of a model preset)."""

    context: list[tuple[str, list[int]]] = field(default_factory=list)
    """Models that speak their segments in context
    (``speech_segments_in_context``): the text and generated token ids of the
    request's previous segments, in order."""
