# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Named voices: reference audio + transcript, encoded once, kept on disk.

Layout of the voices directory (``--speech-voices-dir``)::

    <dir>/<name>/reference.wav   the reference audio (as uploaded, re-encoded)
    <dir>/<name>/voice.json      {"name", "ref_text", "created_at"}
    <dir>/<name>/prompt.npz      the encoded VoicePrompt (cache; rebuilt if absent)

A voice directory may also be prepared by hand with ``reference.wav`` and
``reference.txt``; it is encoded on first use.
"""

import json
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vllm.config.text_to_speech import VoicePrompt
from vllm.exceptions import VLLMNotFoundError, VLLMValidationError
from vllm.logger import init_logger

logger = init_logger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

Encoder = Callable[[np.ndarray, int, str], VoicePrompt]


def save_prompt(prompt: VoicePrompt, path: Path) -> None:
    """Arrays only, no pickle: a voices directory is never code."""
    arrays: dict[str, np.ndarray] = {}
    meta: dict = {"ref_text": prompt.ref_text, "extra": {}}
    if prompt.codes is not None:
        arrays["codes"] = np.asarray(prompt.codes)
    for k, v in prompt.extra.items():
        if isinstance(v, np.ndarray):
            arrays[f"extra.{k}"] = v
        else:
            meta["extra"][k] = v
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_prompt(path: Path) -> VoicePrompt:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        extra = dict(meta["extra"])
        extra.update({k[6:]: z[k] for k in z.files if k.startswith("extra.")})
        codes = z["codes"] if "codes" in z.files else None
    return VoicePrompt(ref_text=meta["ref_text"], codes=codes, extra=extra)


def validate_voice_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise VLLMValidationError(
            "voice names are 1-64 characters of letters, digits, '_', '-', '.'",
            parameter="voice",
        )
    return name


class VoiceStore:
    """Thread-safe registry of named voices backed by a directory."""

    def __init__(self, root: str | Path, sample_rate: int, encoder: Encoder):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.sample_rate = sample_rate
        self._encode = encoder
        self._lock = threading.Lock()
        self._cache: dict[str, VoicePrompt] = {}

    def _dir(self, name: str) -> Path:
        d = (self.root / validate_voice_name(name)).resolve()
        if d.parent != self.root:
            raise VLLMValidationError("invalid voice name", parameter="voice")
        return d

    def names(self) -> list[str]:
        return sorted(
            d.name
            for d in self.root.iterdir()
            if d.is_dir() and _NAME.match(d.name) and (d / "reference.wav").exists()
        )

    def info(self, name: str) -> dict:
        d = self._dir(name)
        meta = d / "voice.json"
        if meta.exists():
            return json.loads(meta.read_text())
        if (d / "reference.wav").exists():
            ref_text = (
                (d / "reference.txt").read_text().strip()
                if (d / "reference.txt").exists()
                else ""
            )
            return {
                "name": name,
                "ref_text": ref_text,
                "created_at": int((d / "reference.wav").stat().st_mtime),
            }
        raise VLLMNotFoundError(f"voice {name!r} does not exist")

    def exists(self, name: str) -> bool:
        try:
            return (self._dir(name) / "reference.wav").exists()
        except VLLMValidationError:
            return False

    def add(
        self, name: str, audio: np.ndarray, ref_text: str, overwrite: bool = False
    ) -> dict:
        """Encode and store a voice. ``audio`` is float32 mono at the
        store's sample rate."""
        import soundfile

        d = self._dir(name)
        if not ref_text or not ref_text.strip():
            raise VLLMValidationError("ref_text is required", parameter="ref_text")
        prompt = self._encode(audio, self.sample_rate, ref_text.strip())
        prompt.name = name
        with self._lock:
            if d.exists() and not overwrite:
                raise VLLMValidationError(
                    f"voice {name!r} already exists", parameter="name"
                )
            tmp = d.with_name(f".{d.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            soundfile.write(
                tmp / "reference.wav", audio, self.sample_rate, subtype="PCM_16"
            )
            meta = {
                "name": name,
                "ref_text": ref_text.strip(),
                "created_at": int(time.time()),
            }
            (tmp / "voice.json").write_text(json.dumps(meta))
            save_prompt(prompt, tmp / "prompt.npz")
            shutil.rmtree(d, ignore_errors=True)
            tmp.rename(d)
            self._cache[name] = prompt
        logger.info("Registered voice %r", name)
        return meta

    def delete(self, name: str) -> None:
        d = self._dir(name)
        with self._lock:
            if not d.exists():
                raise VLLMNotFoundError(f"voice {name!r} does not exist")
            shutil.rmtree(d)
            self._cache.pop(name, None)

    def get(self, name: str) -> VoicePrompt:
        """The encoded prompt of a voice (cached in memory and on disk)."""
        with self._lock:
            if name in self._cache:
                return self._cache[name]
        d = self._dir(name)
        if not (d / "reference.wav").exists():
            raise VLLMNotFoundError(f"voice {name!r} does not exist")
        cached = d / "prompt.npz"
        prompt = None
        if cached.exists():
            try:
                prompt = load_prompt(cached)
            except Exception:
                logger.warning("Re-encoding voice %r: unreadable cache", name)
        if prompt is None:
            from vllm.entrypoints.text_to_speech.audio import load_reference_audio

            audio = load_reference_audio(
                (d / "reference.wav").read_bytes(), self.sample_rate, max_seconds=3600
            )
            prompt = self._encode(audio, self.sample_rate, self.info(name)["ref_text"])
            save_prompt(prompt, cached)
        prompt.name = name
        with self._lock:
            self._cache[name] = prompt
        return prompt
