#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The README's main job, on the embedded demo checkpoint.

Starts vLLM's OpenAI-compatible server (the patched build) on embedded demo
checkpoints (tiny, random weights, in each model's original release format)
and calls it with the official `openai` client:

1. a text completion on a tiny Qwen2 (tools/make_demo_checkpoint.py);
2. Fish Speech (OpenAudio S1 release layout: model.pth, config.json,
   tokenizer.tiktoken, special_tokens.json, codec.pth; made by
   tools/make_fish_checkpoint.py and tools/make_fish_codec.py) synthesizing
   a WAV through /v1/audio/speech, one-shot and streamed;
3. FireRedASR-AED (tools/make_fireredasr_checkpoint.py) transcribing that WAV
   through /v1/audio/transcriptions.
Random weights: the speech is noise-like and the text is noise.

    .venv/bin/python tools/demo.py [--out demo-out]

Results: demo-out/completion.json, demo-out/speech.wav, demo-out/speech.json,
demo-out/transcript.json, server logs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model: Path, extra_args: list[str] = (), timeout: float = 300.0,
          log_path: Path | None = None):
    """Run `python -m vllm.entrypoints.openai.api_server` until the block ends.

    Yields the base URL (http://127.0.0.1:PORT). Raises with the server's log
    tail if it exits or does not become healthy within `timeout` seconds.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
           *extra_args]
    log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-serve-{port}.log"
    log = open(log_path, "w")
    # PYTHONSAFEPATH: `python -m` would put the working directory first on
    # sys.path, and this repository's vllm/ (overlay files only) would shadow
    # parts of the installed package when run from the repository root.
    env = dict(os.environ, PYTHONSAFEPATH="1")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}):\n"
                                   + log_path.read_text()[-4000:])
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not healthy after {timeout:.0f}s:\n"
                                   + log_path.read_text()[-4000:])
            time.sleep(1.0)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def transcribe_demo(out: Path, wav: Path) -> dict:
    """Serve the embedded FireRedASR-AED demo checkpoint and transcribe
    `wav` through /v1/audio/transcriptions with the openai client."""
    from make_fireredasr_checkpoint import make_aed
    from openai import OpenAI

    ckpt = make_aed(ROOT / "build" / "demo" / "FireRedASR-AED-L")
    t0 = time.monotonic()
    with serve(ckpt, ["--dtype", "float32", "--enforce-eager",
                      "--max-model-len", "2048", "--max-num-seqs", "4",
                      "--kv-cache-memory-bytes", str(64 << 20)],
               log_path=out / "asr-server.log") as base:
        ready = time.monotonic() - t0
        client = OpenAI(base_url=base + "/v1", api_key="EMPTY")
        model = client.models.list().data[0].id
        with open(wav, "rb") as f:
            res = client.audio.transcriptions.create(
                model=model, file=(wav.name, f.read()), response_format="verbose_json")
    result = {"model": model, "audio": str(wav), "text": res.text,
              "duration_s": res.duration, "server_ready_s": round(ready, 1)}
    (out / "transcript.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return result


def speech_demo(out: Path, text: str) -> dict:
    """Serve the embedded Fish Speech demo checkpoint and synthesize `text`
    to demo-out/speech.wav with the openai client (one-shot and streamed)."""
    import io

    import soundfile
    import torch
    from make_fish_checkpoint import make_s1
    from make_fish_codec import make_s1_codec
    from openai import OpenAI

    ckpt = ROOT / "build" / "demo" / "openaudio-s1-tiny"
    if not (ckpt / "codec.pth").is_file():
        make_s1(ckpt, seed=0, dtype=torch.float32, dims={"num_codebooks": 10},
                codebook_size=4096)
        make_s1_codec(ckpt / "codec.pth", seed=0)
    t0 = time.monotonic()
    with serve(ckpt, ["--dtype", "float32", "--enforce-eager",
                      "--max-model-len", "512", "--max-num-seqs", "4",
                      "--kv-cache-memory-bytes", str(64 << 20)],
               log_path=out / "tts-server.log") as base:
        ready = time.monotonic() - t0
        client = OpenAI(base_url=base + "/v1", api_key="EMPTY")
        model = client.models.list().data[0].id
        t1 = time.monotonic()
        res = client.audio.speech.create(model=model, input=text, voice="default",
                                         response_format="wav",
                                         extra_body={"seed": 0, "max_new_tokens": 64})
        took = time.monotonic() - t1
        wav = out / "speech.wav"
        wav.write_bytes(res.content)
        streamed = 0
        with client.audio.speech.with_streaming_response.create(
                model=model, input=text, voice="default", response_format="pcm",
                extra_body={"seed": 0, "max_new_tokens": 64,
                            "stream_format": "audio"}) as resp:
            for chunk in resp.iter_bytes():
                streamed += len(chunk)
    audio, sr = soundfile.read(io.BytesIO(res.content))
    result = {"model": model, "input": text, "wav": str(wav), "sample_rate": sr,
              "audio_s": round(len(audio) / sr, 3), "request_s": round(took, 2),
              "streamed_pcm_bytes": streamed, "server_ready_s": round(ready, 1)}
    (out / "speech.json").write_text(json.dumps(result, indent=2))
    return result


def completion_demo(out: Path, prompt: str) -> dict:
    from make_demo_checkpoint import make_checkpoint
    from openai import OpenAI

    ckpt = make_checkpoint(ROOT / "build" / "demo" / "qwen2-tiny")
    t0 = time.monotonic()
    with serve(ckpt, ["--dtype", "float32", "--max-model-len", "512",
                      "--kv-cache-memory-bytes", str(256 << 20),
                      "--max-num-seqs", "8"], log_path=out / "server.log") as base:
        ready = time.monotonic() - t0
        client = OpenAI(base_url=base + "/v1", api_key="EMPTY")
        model = client.models.list().data[0].id
        res = client.completions.create(model=model, prompt=prompt,
                                        max_tokens=16, temperature=0.0)
    result = {"model": model, "prompt": prompt, "completion": res.choices[0].text,
              "completion_tokens": res.usage.completion_tokens,
              "server_ready_s": round(ready, 1)}
    (out / "completion.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "demo-out")
    ap.add_argument("--prompt", default="The quick brown fox")
    ap.add_argument("--text", default="Hello world, and the rest of it.")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(completion_demo(a.out, a.prompt), indent=2))
    # Text to speech through /v1/audio/speech, then speech recognition of
    # that WAV through /v1/audio/transcriptions.
    speech = speech_demo(a.out, a.text)
    print(json.dumps(speech, indent=2))
    print(json.dumps(transcribe_demo(a.out, Path(speech["wav"])), indent=2,
                     ensure_ascii=False))


if __name__ == "__main__":
    main()
