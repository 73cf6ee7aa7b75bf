# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""End-to-end tests of the generic ``/v1/audio/speech`` layer on CPU.

One OpenAI-compatible server per module, running the test speech model
``tone_tts.ToneTTSForCausalLM`` (see its docstring) on a tiny random Qwen2
checkpoint, called with the official ``openai`` client and plain HTTP.
"""

import base64
import io
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile

HERE = Path(__file__).resolve().parent
REPO = Path(os.path.realpath(__file__)).parents[3]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(HERE))

from tone_tts import SAMPLE_RATE, SAMPLES_PER_FRAME, ToneDecoder  # noqa: E402

DEFAULT_FRAMES = 24


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    ref = (0.5 * np.sin(2 * np.pi * 440 * t) * np.linspace(0, 1, t.size)).astype(
        np.float32
    )
    soundfile.write(d / "ref.wav", ref, SAMPLE_RATE)
    # A 44.1 kHz stereo FLAC: any rate / channel count must be accepted.
    stereo = np.stack([ref, ref], axis=1)
    soundfile.write(d / "ref44k.flac", np.repeat(stereo, 3, axis=0)[:44100], 44100)
    return d


@pytest.fixture(scope="module")
def server(tmp_path_factory, media_dir):
    from demo import serve
    from make_demo_checkpoint import make_checkpoint

    ckpt = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tone")
    voices = tmp_path_factory.mktemp("voices")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), old]))
    try:
        with serve(
            ckpt,
            [
                "--dtype",
                "float32",
                "--max-model-len",
                "512",
                "--max-num-seqs",
                "8",
                "--kv-cache-memory-bytes",
                str(64 << 20),
                "--enforce-eager",
                "--model-class-overrides",
                json.dumps({"Qwen2ForCausalLM": "tone_tts:ToneTTSForCausalLM"}),
                "--speech-voices-dir",
                str(voices),
                "--allowed-local-media-path",
                str(media_dir),
            ],
        ) as base:
            yield {"base": base, "model": str(ckpt), "voices": voices}
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["base"] + "/v1", api_key="EMPTY")


def post(server, path, body=None, *, data=None, headers=None, method="POST"):
    req = urllib.request.Request(
        server["base"] + path,
        method=method,
        data=data
        if data is not None
        else (json.dumps(body).encode() if body else None),
        headers=headers or {"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers.get("content-type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type"), e.read()


def speak(server, **fields):
    body = {"model": server["model"], "input": "hello world", "voice": "default"}
    body.update(fields)
    return post(server, "/v1/audio/speech", body)


def wav(data: bytes) -> tuple[np.ndarray, int]:
    audio, sr = soundfile.read(io.BytesIO(data), dtype="float32")
    return audio, sr


def dominant_freqs(audio: np.ndarray) -> list[float]:
    out = []
    n = SAMPLES_PER_FRAME
    for t in range(len(audio) // n):
        seg = audio[t * n + 80 : (t + 1) * n]  # past the cross-fade
        spec = np.abs(np.fft.rfft(seg, 4096))
        out.append(np.argmax(spec) * SAMPLE_RATE / 4096)
    return out


# ------------------------------------------------------------ the client
def test_openai_client_wav(client, server):
    res = client.audio.speech.create(
        model=server["model"],
        voice="default",
        input="hello world",
        response_format="wav",
    )
    audio, sr = wav(res.content)
    assert sr == SAMPLE_RATE
    assert len(audio) == DEFAULT_FRAMES * SAMPLES_PER_FRAME
    # Every frame is one of the model's tones: 200 + 25 k Hz.
    for f in dominant_freqs(audio):
        assert abs((f - 200) / 25 - round((f - 200) / 25)) < 0.2 and 200 <= f <= 1800, f
    again = client.audio.speech.create(
        model=server["model"],
        voice="default",
        input="hello world",
        response_format="wav",
    )
    assert again.content == res.content  # greedy by default: deterministic


def test_openai_client_streaming_equals_one_shot(client, server):
    one_shot = client.audio.speech.create(
        model=server["model"],
        voice="default",
        input="stream me",
        response_format="pcm",
        extra_body={"max_new_tokens": 50},
    )
    with client.audio.speech.with_streaming_response.create(
        model=server["model"],
        voice="default",
        input="stream me",
        response_format="pcm",
        extra_body={"stream_format": "audio", "max_new_tokens": 50},
    ) as r:
        chunks = list(r.iter_bytes())
    streamed = b"".join(chunks)
    assert len(streamed) == 50 * SAMPLES_PER_FRAME * 2
    a = np.frombuffer(streamed, "<i2").astype(np.int32)
    b = np.frombuffer(one_shot.content, "<i2").astype(np.int32)
    assert np.abs(a - b).max() <= 1  # chunk joins are seamless


def test_sse_stream(server):
    status, ctype, body = speak(
        server,
        input="events",
        response_format="pcm",
        stream_format="sse",
        max_new_tokens=40,
    )
    assert status == 200 and ctype.startswith("text/event-stream")
    events = [
        json.loads(line[6:])
        for line in body.decode().splitlines()
        if line.startswith("data: ")
    ]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2 and events[-1]["type"] == "speech.audio.done"
    pcm = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    _, _, ref = speak(server, input="events", response_format="pcm", max_new_tokens=40)
    assert (
        np.abs(
            np.frombuffer(pcm, "<i2").astype(int)
            - np.frombuffer(ref, "<i2").astype(int)
        ).max()
        <= 1
    )
    assert events[-1]["usage"]["output_tokens"] == 40


def test_wav_stream_has_header(server):
    status, ctype, body = speak(server, response_format="wav", stream_format="audio")
    assert status == 200 and ctype == "audio/wav"
    assert body[:4] == b"RIFF" and body[8:12] == b"WAVE"
    assert len(body) == 44 + DEFAULT_FRAMES * SAMPLES_PER_FRAME * 2


@pytest.mark.parametrize(
    "fmt,sf_format", [("flac", "FLAC"), ("mp3", "MP3"), ("opus", "OGG")]
)
def test_formats(server, fmt, sf_format):
    status, ctype, body = speak(server, response_format=fmt)
    assert status == 200, body
    info = soundfile.info(io.BytesIO(body))
    assert info.format == sf_format
    assert abs(info.duration - DEFAULT_FRAMES * 0.02) < 0.05


def test_pcm_and_speed(server):
    _, _, pcm = speak(server, response_format="pcm")
    assert len(pcm) == DEFAULT_FRAMES * SAMPLES_PER_FRAME * 2
    _, _, fast = speak(server, response_format="pcm", speed=2.0)
    assert abs(len(fast) / 2 - DEFAULT_FRAMES * SAMPLES_PER_FRAME / 2) <= 2
    base = np.frombuffer(pcm, "<i2").astype(np.float32) / 32767
    sped = np.frombuffer(fast, "<i2").astype(np.float32) / 32767
    # tempo changes, pitch does not: the same tone set is present
    spec_a = np.abs(np.fft.rfft(base, 16384))
    spec_b = np.abs(np.fft.rfft(sped, 16384))
    assert abs(np.argmax(spec_a) - np.argmax(spec_b)) <= 40  # within 40 bins (~40 Hz)


def test_sampling_overrides_and_seed(server):
    args = dict(temperature=1.0, top_p=0.9, seed=7, response_format="pcm")
    _, _, a = speak(server, **args)
    _, _, b = speak(server, **args)
    _, _, c = speak(server, **{**args, "seed": 8})
    assert a == b and a != c
    status, _, d = speak(server, response_format="pcm", max_new_tokens=5)
    assert status == 200 and len(d) == 5 * SAMPLES_PER_FRAME * 2


def test_preset_voice(server):
    _, _, default = speak(server, response_format="pcm")
    status, _, low = speak(server, response_format="pcm", voice="low")
    assert status == 200 and low != default


# ------------------------------------------------------------ cloning
def test_ref_audio_base64_data_url_and_file(server, media_dir):
    raw = (media_dir / "ref.wav").read_bytes()
    _, _, plain = speak(server, response_format="pcm")
    s1, _, a = speak(
        server,
        response_format="pcm",
        ref_text="a reference",
        ref_audio=base64.b64encode(raw).decode(),
    )
    s2, _, b = speak(
        server,
        response_format="pcm",
        ref_text="a reference",
        ref_audio="data:audio/wav;base64," + base64.b64encode(raw).decode(),
    )
    s3, _, c = speak(
        server,
        response_format="pcm",
        ref_text="a reference",
        ref_audio=f"file://{media_dir / 'ref.wav'}",
    )
    assert (s1, s2, s3) == (200, 200, 200)
    assert a == b == c and a != plain
    s4, _, _ = speak(
        server, ref_text="x", ref_audio=f"file://{media_dir / 'ref44k.flac'}"
    )
    assert s4 == 200


def test_named_voices(server, media_dir):
    raw = (media_dir / "ref.wav").read_bytes()
    boundary = "----vllmspeech"

    def form(fields, file_bytes):
        parts = []
        for k, v in fields.items():
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"'
                f"\r\n\r\n{v}\r\n".encode()
            )
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; '
            f'filename="ref.wav"\r\nContent-Type: audio/wav\r\n\r\n'.encode()
            + file_bytes
            + b"\r\n"
        )
        parts.append(f"--{boundary}--\r\n".encode())
        return b"".join(parts)

    hdr = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, _, body = post(
        server,
        "/v1/audio/voices",
        data=form({"name": "alice", "ref_text": "a reference"}, raw),
        headers=hdr,
    )
    assert status == 200, body
    assert json.loads(body)["name"] == "alice"
    assert (server["voices"] / "alice" / "prompt.npz").exists()
    status, _, body = post(server, "/v1/audio/voices", method="GET", headers={})
    assert [v["name"] for v in json.loads(body)["data"]] == ["alice"]
    # The named voice conditions exactly like the same ref_audio would.
    _, _, named = speak(server, response_format="pcm", voice="alice")
    _, _, direct = speak(
        server,
        response_format="pcm",
        ref_text="a reference",
        ref_audio=base64.b64encode(raw).decode(),
    )
    assert named == direct
    # Bad names and duplicates are refused; delete works.
    status, _, body = post(
        server,
        "/v1/audio/voices",
        data=form({"name": "../evil", "ref_text": "x"}, raw),
        headers=hdr,
    )
    assert status == 400 and b"voice names" in body
    status, _, _ = post(
        server,
        "/v1/audio/voices",
        data=form({"name": "alice", "ref_text": "x"}, raw),
        headers=hdr,
    )
    assert status == 400
    status, _, _ = post(server, "/v1/audio/voices/alice", method="DELETE", headers={})
    assert status == 200
    status, _, body = speak(server, voice="alice")
    assert status == 404 and b"alice" in body


# ------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "fields,code,needle",
    [
        ({"input": ""}, 400, "input is empty"),
        ({"input": "   "}, 400, "input is empty"),
        ({"input": "x" * 201}, 400, "limit is 200"),
        ({"voice": "nobody"}, 404, "nobody"),
        ({"response_format": "aac"}, 400, "response_format"),
        ({"speed": 0.1}, 400, "speed"),
        ({"speed": 4.5}, 400, "speed"),
        ({"response_format": "mp3", "stream_format": "audio"}, 400, "streaming"),
        ({"ref_audio": "bm90IGF1ZGlv", "ref_text": "x"}, 400, "ref_audio"),
        ({"ref_audio": "%%%", "ref_text": "x"}, 400, "base64"),
        ({"ref_audio": "UklGRg=="}, 400, "ref_text"),
        ({"ref_audio": "file:///etc/passwd", "ref_text": "x"}, 400, "outside"),
        ({"ref_audio": "https://example.com/a.wav", "ref_text": "x"}, 400, "ref_audio"),
        ({"max_new_tokens": 100000}, 400, "max_new_tokens"),
        ({"top_p": 1.5}, 400, "top_p"),
        ({"unknown_field": 1}, 400, "unknown_field"),
        ({"instructions": "whisper"}, 400, "instructions"),
    ],
)
def test_bad_input(server, fields, code, needle):
    status, _, body = speak(server, **fields)
    assert status == code, body
    assert needle.encode() in body, body


def test_too_long_reference(server, tmp_path):
    long = np.zeros(11 * SAMPLE_RATE, np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, long, SAMPLE_RATE, format="WAV")
    status, _, body = speak(
        server, ref_text="x", ref_audio=base64.b64encode(buf.getvalue()).decode()
    )
    assert status == 400 and b"10" in body


def test_engine_survives_bad_requests_and_metrics(server):
    status, _, _ = speak(server, input="")
    status, _, body = speak(server, response_format="wav")
    assert status == 200
    with urllib.request.urlopen(server["base"] + "/metrics") as r:
        text = r.read().decode()
    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith("vllm:speech_audio_seconds_total")
    )
    assert float(line.split()[-1]) > 0
    assert "vllm:speech_time_to_first_audio_seconds_bucket" in text
    assert "vllm:speech_real_time_factor_bucket" in text


def test_left_context_stream_equals_one_shot():
    """The streaming session the tone decoder uses, checked directly."""
    dec = ToneDecoder(device=None)
    ids = np.random.default_rng(0).integers(0, 500, size=(37, 1))
    full = dec.decode([ids])[0]
    session, parts, sent = dec.open_stream(), [], 0
    for end in (5, 6, 20, 37):
        parts.append(session.decode(ids[sent:end]))
        sent = end
    np.testing.assert_allclose(np.concatenate(parts), full, atol=1e-6)
    # without the left context, the joins would differ
    naive = np.concatenate(
        [dec.decode([ids[a:b]])[0] for a, b in ((0, 5), (5, 6), (6, 20), (20, 37))]
    )
    assert np.abs(naive - full).max() > 1e-2
