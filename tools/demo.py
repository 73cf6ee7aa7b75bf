#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The README's main job, on the embedded demo checkpoint.

Starts vLLM's OpenAI-compatible server (the patched build) on a tiny random
checkpoint made by tools/make_demo_checkpoint.py, asks it for a completion
through the official `openai` client, and writes the result to demo-out/.

    .venv/bin/python tools/demo.py [--out demo-out]

Until the TTS/ASR models land this is a small generation through the patched
engine; the speech demo replaces it (synthesize a WAV, transcribe it).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "demo-out")
    ap.add_argument("--prompt", default="The quick brown fox")
    a = ap.parse_args()
    from make_demo_checkpoint import make_checkpoint
    from openai import OpenAI

    a.out.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(ROOT / "build" / "demo" / "qwen2-tiny")
    t0 = time.monotonic()
    with serve(ckpt, ["--dtype", "float32", "--max-model-len", "512",
                      "--kv-cache-memory-bytes", str(256 << 20),
                      "--max-num-seqs", "8"], log_path=a.out / "server.log") as base:
        ready = time.monotonic() - t0
        client = OpenAI(base_url=base + "/v1", api_key="EMPTY")
        model = client.models.list().data[0].id
        res = client.completions.create(model=model, prompt=a.prompt,
                                        max_tokens=16, temperature=0.0)
    text = res.choices[0].text
    result = {"model": model, "prompt": a.prompt, "completion": text,
              "completion_tokens": res.usage.completion_tokens,
              "server_ready_s": round(ready, 1)}
    (a.out / "completion.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
