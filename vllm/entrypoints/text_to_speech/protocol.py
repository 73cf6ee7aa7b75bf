# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Request/response schemas of ``/v1/audio/speech`` and ``/v1/audio/voices``.

The OpenAI fields (``model``, ``input``, ``voice``, ``response_format``,
``speed``, ``stream_format``, ``instructions``) plus zero-shot cloning
(``ref_audio`` + ``ref_text``), a voice per speaker for multi-speaker
models (``voices``), sampling overrides, ``seed`` and ``max_new_tokens``.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

AudioFormat = Literal["wav", "pcm", "flac", "mp3", "opus"]

# Content types of the encoded formats.
MEDIA_TYPES: dict[str, str] = {
    "wav": "audio/wav",
    "pcm": "audio/pcm",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
}

SPEED_MIN, SPEED_MAX = 0.25, 4.0


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: str
    """The text to speak."""

    voice: str | None = None
    """A registered voice name (see ``/v1/audio/voices``) or a model preset."""

    response_format: str = "wav"
    """wav, pcm (16-bit little-endian mono), flac, mp3 or opus."""

    speed: float = 1.0
    """Tempo factor in [0.25, 4.0]; pitch is kept."""

    stream_format: Literal["audio", "sse"] | None = None
    """Stream the audio as it is generated: raw audio bytes or server-sent
    events (``speech.audio.delta`` / ``speech.audio.done``)."""

    instructions: str | None = None
    """Accepted for OpenAI compatibility; models without style control
    reject a non-empty value."""

    ref_audio: str | None = None
    """Reference audio for zero-shot cloning: base64, a ``data:`` URL, or a
    ``file://`` path inside ``--allowed-local-media-path``."""

    ref_text: str | None = None
    """Transcript of ``ref_audio``."""

    voices: list[str] | None = Field(default=None, min_length=1)
    """Multi-speaker models (e.g. SoulX-Podcast): one voice per speaker of
    the input script (``[S1]``, ``[S2]``, ...), in order; each a registered
    voice or a model preset."""

    seed: int | None = None
    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = None
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    extra_args: dict[str, Any] | None = None
    """Model-specific options passed to the model's prompt/sampler hooks."""


class VoiceInfo(BaseModel):
    name: str
    ref_text: str
    created_at: int
    object: Literal["voice"] = "voice"


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VoiceInfo]
