# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Audio helpers of the speech API: reading references, tempo, encoding."""

import base64
import binascii
import io
import struct
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from vllm.exceptions import VLLMValidationError

# libsndfile's Opus encoder only takes these rates.
_OPUS_RATES = (48000, 24000, 16000, 12000, 8000)


def load_reference_audio(data: bytes, target_sr: int, max_seconds: float) -> np.ndarray:
    """Decode audio bytes (any format soundfile/PyAV reads) to float32 mono
    at ``target_sr``; raises ``VLLMValidationError`` for bad audio."""
    from vllm.multimodal.media.audio import load_audio

    if not data:
        raise VLLMValidationError("ref_audio is empty", parameter="ref_audio")
    try:
        with io.BytesIO(data) as buf:
            audio, _ = load_audio(buf, sr=target_sr, max_duration_s=max_seconds)
    except ValueError as e:
        raise VLLMValidationError(
            f"ref_audio could not be used: {e}", parameter="ref_audio"
        ) from e
    except Exception as e:
        raise VLLMValidationError(
            "ref_audio is not a readable audio file", parameter="ref_audio"
        ) from e
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1 or audio.size == 0:
        raise VLLMValidationError("ref_audio has no samples", parameter="ref_audio")
    if audio.size / target_sr > max_seconds:
        raise VLLMValidationError(
            f"ref_audio is longer than {max_seconds:g} s", parameter="ref_audio"
        )
    if not np.isfinite(audio).all():
        raise VLLMValidationError("ref_audio contains NaN/inf", parameter="ref_audio")
    return audio


def read_reference_source(value: str, allowed_dir: str | None) -> bytes:
    """Bytes of ``ref_audio``: base64, a ``data:`` URL, or ``file://`` under
    ``allowed_dir`` (the server's ``--allowed-local-media-path``)."""
    value = value.strip()
    if value.startswith("data:"):
        header, _, payload = value.partition(",")
        if ";base64" not in header:
            raise VLLMValidationError(
                "ref_audio data URL must be base64-encoded", parameter="ref_audio"
            )
        value = payload
    elif value.startswith("file:") or value.startswith("/"):
        return _read_local_file(value, allowed_dir)
    elif "://" in value:
        raise VLLMValidationError(
            "ref_audio must be base64, a data: URL or a file:// path",
            parameter="ref_audio",
        )
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise VLLMValidationError(
            "ref_audio is not valid base64", parameter="ref_audio"
        ) from e


def _read_local_file(value: str, allowed_dir: str | None) -> bytes:
    if not allowed_dir:
        raise VLLMValidationError(
            "local ref_audio files need the server to be started with "
            "--allowed-local-media-path",
            parameter="ref_audio",
        )
    path = unquote(urlparse(value).path) if value.startswith("file:") else value
    root = Path(allowed_dir).resolve()
    target = Path(path).resolve()
    if not target.is_relative_to(root):
        raise VLLMValidationError(
            "ref_audio path is outside --allowed-local-media-path",
            parameter="ref_audio",
        )
    if not target.is_file():
        raise VLLMValidationError(
            f"ref_audio file {path!r} does not exist", parameter="ref_audio"
        )
    return target.read_bytes()


def change_tempo(audio: np.ndarray, speed: float, sample_rate: int) -> np.ndarray:
    """Time-scale ``audio`` by ``1/speed`` keeping the pitch (WSOLA)."""
    if abs(speed - 1.0) < 1e-6 or audio.size == 0:
        return audio
    win = max(64, int(0.03 * sample_rate))  # 30 ms frames
    hop_out = win // 2
    hop_in = hop_out * speed
    tol = hop_out // 2  # search range for the best-aligned segment
    window = np.hanning(win).astype(np.float32)
    n_out = int(np.ceil(audio.size / speed)) + win
    padded = np.concatenate(
        [
            np.zeros(tol, np.float32),
            audio,
            np.zeros(win + 2 * tol + hop_out, np.float32),
        ]
    )
    out = np.zeros(n_out + win, np.float32)
    norm = np.zeros(n_out + win, np.float32)
    prev = None  # natural continuation of the previously copied segment
    k = 0
    while True:
        center = int(round(k * hop_in)) + tol
        if center - tol >= audio.size + tol:
            break
        if prev is None:
            start = center
        else:
            lo, hi = max(0, center - tol), center + tol
            region = padded[lo : hi + win]
            # cross-correlation of candidate segments with the continuation
            corr = np.correlate(region, prev, mode="valid")[: hi - lo + 1]
            start = lo + int(np.argmax(corr))
        seg = padded[start : start + win]
        if seg.size < win:
            break
        pos = k * hop_out
        out[pos : pos + win] += seg * window
        norm[pos : pos + win] += window
        prev = padded[start + hop_out : start + hop_out + win]
        if prev.size < win:
            break
        k += 1
    n_target = int(round(audio.size / speed))
    norm[norm < 1e-6] = 1.0
    return (out / norm)[:n_target].astype(np.float32)


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def wav_stream_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length."""
    unknown = 0xFFFFFFFF
    return (
        b"RIFF" + struct.pack("<I", unknown) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate,
                                sample_rate * 2, 2, 16)
        + b"data" + struct.pack("<I", unknown)
    )  # fmt: skip


def encode_audio(audio: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """Encode a float32 mono waveform in one of the response formats."""
    import soundfile

    if fmt == "pcm":
        return pcm16(audio)
    buf = io.BytesIO()
    audio = np.clip(audio, -1.0, 1.0)
    if fmt == "wav":
        soundfile.write(buf, audio, sample_rate, format="WAV", subtype="PCM_16")
    elif fmt == "flac":
        soundfile.write(buf, audio, sample_rate, format="FLAC", subtype="PCM_16")
    elif fmt == "mp3":
        soundfile.write(buf, audio, sample_rate, format="MP3", subtype="MPEG_LAYER_III")
    elif fmt == "opus":
        rate = next((r for r in _OPUS_RATES if r <= sample_rate), 8000)
        if rate != sample_rate:
            from vllm.multimodal.audio import resample_audio_soxr

            audio = resample_audio_soxr(audio, orig_sr=sample_rate, target_sr=rate)
        soundfile.write(buf, audio, rate, format="OGG", subtype="OPUS")
    else:
        raise VLLMValidationError(
            f"unsupported response_format {fmt!r}", parameter="response_format"
        )
    return buf.getvalue()
