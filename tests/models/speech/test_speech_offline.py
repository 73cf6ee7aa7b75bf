# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The offline speech API and the decode worker, on CPU."""

import asyncio
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
REPO = Path(os.path.realpath(__file__)).parents[3]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(HERE))

from tone_tts import SAMPLE_RATE, SAMPLES_PER_FRAME, ToneDecoder  # noqa: E402


@pytest.fixture(scope="module")
def tts(tmp_path_factory):
    from make_demo_checkpoint import make_checkpoint

    from vllm.entrypoints.text_to_speech.offline import SpeechSynthesizer

    ckpt = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tone")
    old = os.environ.get("PYTHONPATH")
    # The engine core runs in a child process: it must import tone_tts too.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), old]))
    synth = SpeechSynthesizer(
        str(ckpt),
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
        kv_cache_memory_bytes=64 << 20,
        max_num_seqs=8,
        model_class_overrides={"Qwen2ForCausalLM": "tone_tts:ToneTTSForCausalLM"},
    )
    yield synth
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def test_synthesize_batch(tts):
    outs = tts.synthesize(["hello world", "second text", "hello world"])
    assert [o.sample_rate for o in outs] == [SAMPLE_RATE] * 3
    for o in outs:
        assert o.frames.shape == (24, 1)
        assert o.audio.shape == (24 * SAMPLES_PER_FRAME,)
        np.testing.assert_array_equal(o.audio, ToneDecoder(None).decode([o.frames])[0])
    np.testing.assert_array_equal(outs[0].audio, outs[2].audio)  # greedy
    assert not np.array_equal(outs[0].frames, outs[1].frames)


def test_voice_speed_and_options(tts):
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    ref = (0.5 * np.sin(2 * np.pi * 440 * t) * np.linspace(0, 1, t.size)).astype(
        np.float32
    )
    voice = tts.encode_voice(ref, "a reference", sample_rate=SAMPLE_RATE)
    assert (
        voice.codes is not None and len(voice.codes) == SAMPLE_RATE // SAMPLES_PER_FRAME
    )
    plain, cloned = (
        tts.synthesize(["hello world"])[0],
        tts.synthesize(["hello world"], voice=voice)[0],
    )
    assert not np.array_equal(plain.frames, cloned.frames)
    fast = tts.synthesize("hello world", speed=2.0, max_new_tokens=10)[0]
    assert fast.frames.shape[0] == 10
    assert abs(fast.audio.size - 10 * SAMPLES_PER_FRAME / 2) <= 2
    a = tts.synthesize("x y", temperature=1.0, seed=3)[0]
    b = tts.synthesize("x y", temperature=1.0, seed=3)[0]
    np.testing.assert_array_equal(a.frames, b.frames)


def test_offline_bad_input(tts):
    with pytest.raises(ValueError, match="empty"):
        tts.synthesize([""])
    with pytest.raises(ValueError, match="exceeds"):
        tts.synthesize(["x" * 201])
    with pytest.raises(ValueError, match="speed"):
        tts.synthesize("x", speed=9)
    with pytest.raises(TypeError, match="unknown sampling"):
        tts.synthesize("x", temprature=0.5)
    with pytest.raises(ValueError, match="ref_text"):
        tts.encode_voice(np.zeros(1600, np.float32), "", sample_rate=SAMPLE_RATE)
    # and the engine still works afterwards
    assert tts.synthesize("ok")[0].audio.size > 0


def test_decode_worker_batches_concurrent_requests():
    from vllm.entrypoints.text_to_speech.serving import DecodeWorker

    class SlowDecoder(ToneDecoder):
        gate = threading.Event()

        def decode(self, frames, voices=None):
            self.gate.wait(5)  # hold the first call so the rest queue up
            return super().decode(frames, voices)

    dec = SlowDecoder(None)
    worker = DecodeWorker(dec, max_batch=16)
    rng = np.random.default_rng(0)
    jobs = [rng.integers(0, 100, size=(n, 1)) for n in range(3, 11)]

    async def main():
        tasks = [asyncio.ensure_future(worker.decode(j)) for j in jobs]
        await asyncio.sleep(0.2)
        SlowDecoder.gate.set()
        return await asyncio.gather(*tasks)

    outs = asyncio.run(main())
    for j, o in zip(jobs, outs):
        np.testing.assert_array_equal(o, ToneDecoder(None).decode([j])[0])
    assert len(dec.calls) < len(jobs) and max(dec.calls) > 1, dec.calls

    class Broken(ToneDecoder):
        def decode(self, frames, voices=None):
            raise RuntimeError("codec exploded")

    bw = DecodeWorker(Broken(None))
    with pytest.raises(RuntimeError, match="exploded"):
        asyncio.run(bw.decode(jobs[0]))
    # the worker thread survives a failing batch
    assert asyncio.run(bw.call(lambda: 41 + 1)) == 42

    # ... and a caller whose event loop is gone before its result (or its
    # stream's chunks) can be handed back
    started = threading.Event()

    def slow():
        started.set()
        time.sleep(0.3)
        return 1

    async def leave():
        asyncio.ensure_future(bw.call(slow))
        session = ToneDecoder(None).open_stream(None)
        gen = bw.stream(session, jobs[0])
        asyncio.ensure_future(gen.__anext__())
        await asyncio.to_thread(started.wait, 5)

    asyncio.run(leave())  # closes its loop while both jobs are queued
    time.sleep(0.6)
    assert bw._thread.is_alive()
    assert asyncio.run(bw.call(lambda: 7)) == 7
