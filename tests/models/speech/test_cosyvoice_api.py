# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""CosyVoice2 and CosyVoice3 end to end on CPU:
``vllm.entrypoints.openai.api_server`` on a tiny random release directory of
each generation (original format, see ``tools/make_cosyvoice2_checkpoint.py``
and ``tools/make_cosyvoice3_checkpoint.py``), called with the ``openai``
client and plain HTTP on ``/v1/audio/speech`` and ``/v1/audio/voices``.
Long text: the original frontend's sentence splitting makes one LM request
per segment (``split_speech_text``, ``cosyvoice_frontend.py``; the splitter
itself is checked against the original in ``test_cosyvoice_frontend.py``).

One server per generation (engine start dominates): every test runs against
the CosyVoice2 server, then against the CosyVoice3 one.
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

REPO = Path(os.path.realpath(__file__)).parents[3]
sys.path.insert(0, str(REPO / "tools"))

SR = 24000
SAMPLES_PER_TOKEN = 960  # 25 Hz tokens, 24 kHz audio


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    t = np.arange(2 * 16000) / 16000
    ref = 0.4 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 2 * t)
    soundfile.write(d / "ref.wav", ref.astype(np.float32), 16000)
    return d


RELEASES = {
    "cosyvoice2": ("make_cosyvoice2_checkpoint", "CosyVoice2-tiny"),
    "cosyvoice3": ("make_cosyvoice3_checkpoint", "Fun-CosyVoice3-tiny"),
}


@pytest.fixture(scope="module", params=sorted(RELEASES))
def server(request, tmp_path_factory, media_dir):
    import importlib

    from demo import serve

    maker, name = RELEASES[request.param]
    make_release_dir = importlib.import_module(maker).make_release_dir
    ckpt = make_release_dir(tmp_path_factory.mktemp("ckpt") / name)
    voices = tmp_path_factory.mktemp("voices")
    with serve(
        ckpt,
        [
            "--dtype",
            "float32",
            "--max-model-len",
            "1024",
            "--max-num-seqs",
            "8",
            "--kv-cache-memory-bytes",
            str(64 << 20),
            "--enforce-eager",
            "--speech-voices-dir",
            str(voices),
            "--allowed-local-media-path",
            str(media_dir),
        ],
    ) as base:
        yield {"base": base, "model": str(ckpt)}


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
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.headers.get("content-type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type"), e.read()


def speak(server, **fields):
    body = {"model": server["model"], "input": "hello world", "voice": "default"}
    body.update(fields)
    return post(server, "/v1/audio/speech", body)


def test_openai_client_wav(client, server):
    res = client.audio.speech.create(
        model=server["model"],
        voice="default",
        input="hello world",
        response_format="wav",
        extra_body={"seed": 3},
    )
    audio, sr = soundfile.read(io.BytesIO(res.content), dtype="float32")
    assert sr == SR
    assert len(audio) > 0 and len(audio) % SAMPLES_PER_TOKEN == 0
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0
    again = client.audio.speech.create(
        model=server["model"],
        voice="default",
        input="hello world",
        response_format="wav",
        extra_body={"seed": 3},
    )
    assert again.content == res.content  # seeded RAS, seeded vocoder noise


def test_openai_client_streaming(client, server):
    body = {"seed": 5, "temperature": 0.0}
    one_shot = client.audio.speech.create(
        model=server["model"],
        voice="default",
        input="stream me please",
        response_format="pcm",
        extra_body=body,
    )
    with client.audio.speech.with_streaming_response.create(
        model=server["model"],
        voice="default",
        input="stream me please",
        response_format="pcm",
        extra_body={**body, "stream_format": "audio"},
    ) as r:
        chunks = list(r.iter_bytes())
    streamed = b"".join(chunks)
    # chunked flow + HiFT cache (as the original's stream=True): the same
    # length as the one-shot audio, not the same samples
    assert len(streamed) == len(one_shot.content) > 0
    pcm = np.frombuffer(streamed, "<i2")
    assert np.abs(pcm).max() > 0


def test_sse_stream(server):
    status, ctype, body = speak(
        server,
        input="events please",
        response_format="pcm",
        stream_format="sse",
        temperature=0.0,
    )
    assert status == 200 and ctype.startswith("text/event-stream")
    events = [
        json.loads(line[6:])
        for line in body.decode().splitlines()
        if line.startswith("data: ")
    ]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert deltas and events[-1]["type"] == "speech.audio.done"
    pcm = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert len(pcm) == events[-1]["usage"]["output_tokens"] * SAMPLES_PER_TOKEN * 2


def test_presets_modes_and_formats(server):
    _, _, default = speak(server, response_format="pcm", temperature=0.0)
    s1, _, spk = speak(server, response_format="pcm", voice="spk_a", temperature=0.0)
    s2, _, sft = speak(server, response_format="pcm", voice="spk_sft", temperature=0.0)
    assert (s1, s2) == (200, 200) and spk != default and sft != default
    s3, _, ins = speak(
        server,
        response_format="pcm",
        voice="spk_a",
        temperature=0.0,
        extra_args={"instruct_text": "speak slowly"},
    )
    assert s3 == 200 and ins != spk
    s4, _, flac = speak(server, response_format="flac")
    assert s4 == 200 and soundfile.info(io.BytesIO(flac)).format == "FLAC"
    s5, _, short = speak(server, response_format="pcm", max_new_tokens=3)
    assert s5 == 200 and len(short) == 3 * SAMPLES_PER_TOKEN * 2


def test_zero_shot_and_named_voice(server, media_dir):
    raw = (media_dir / "ref.wav").read_bytes()
    _, _, plain = speak(server, response_format="pcm", temperature=0.0)
    s1, _, a = speak(
        server,
        response_format="pcm",
        temperature=0.0,
        ref_text="a reference",
        ref_audio=base64.b64encode(raw).decode(),
    )
    s2, _, b = speak(
        server,
        response_format="pcm",
        temperature=0.0,
        ref_text="a reference",
        ref_audio=f"file://{media_dir / 'ref.wav'}",
    )
    assert (s1, s2) == (200, 200) and a == b and a != plain
    s3, _, c = speak(
        server,
        response_format="pcm",
        temperature=0.0,
        ref_text="a reference",
        ref_audio=f"file://{media_dir / 'ref.wav'}",
        extra_args={"mode": "cross_lingual"},
    )
    assert s3 == 200 and c != a

    boundary = "cv2boundary"
    parts = []
    for name, value in (("name", "alice"), ("ref_text", "a reference")):
        parts.append(
            f"--{boundary}\r\nContent-Disposition: form-data; "
            f'name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; '
        f'filename="ref.wav"\r\nContent-Type: audio/wav\r\n\r\n'.encode()
        + raw
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    status, _, body = post(
        server,
        "/v1/audio/voices",
        data=b"".join(parts),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert status == 200, body
    s4, _, d = speak(server, response_format="pcm", temperature=0.0, voice="alice")
    assert s4 == 200 and d == a


@pytest.mark.parametrize(
    "fields,code",
    [
        ({"input": ""}, 400),
        ({"voice": "nobody"}, 404),
        ({"ref_audio": "AAAA"}, 400),  # no ref_text
        ({"extra_args": {"mode": "sing"}}, 400),
        ({"extra_args": {"mode": "instruct2"}}, 400),  # no instruct_text
        ({"response_format": "aiff"}, 400),
        ({"speed": 9.0}, 400),
    ],
)
def test_bad_requests(server, fields, code):
    status, _, body = speak(server, **fields)
    assert status == code, body
    assert "error" in json.loads(body)


# ------------------------------------------------------------ long text
TOKENS = 20  # max_new_tokens: with greedy decoding every segment runs to it
ZH_LONG = (
    "今天天气很好，我们一起去公园散步吧！你觉得怎么样？"
    "我说：“好的。”他说：“那我们走吧！”公园里有很多花，红的、黄的、白的都有。"
) * 3 + "最后，我们回家了"
LONG_TEXT_BODY = {
    "voice": "spk_a",
    "response_format": "pcm",
    "temperature": 0.0,
    "max_new_tokens": TOKENS,
}
AS_GIVEN = {"text_frontend": False}


def speak_long(server, **fields):
    """``speak`` with greedy ``spk_a`` PCM at ``TOKENS`` tokens a segment."""
    return speak(server, **{**LONG_TEXT_BODY, **fields})


def ok(server, **fields) -> bytes:
    status, _, body = speak_long(server, **fields)
    assert status == 200, body
    return body


def zh_segments(text):
    from vllm.model_executor.models.cosyvoice_frontend import text_normalize

    return text_normalize(text, len)  # zh lengths count characters


def test_long_text_one_shot_equals_segments(server):
    """One-shot: the segments (generated concurrently) decoded each on its
    own and concatenated, equal to requesting them one by one."""
    segs = zh_segments(ZH_LONG)
    assert len(segs) >= 3
    long_pcm = ok(server, input=ZH_LONG)
    parts = [ok(server, input=s, extra_args=AS_GIVEN) for s in segs]
    assert all(len(p) == TOKENS * SAMPLES_PER_TOKEN * 2 for p in parts)
    assert len(long_pcm) == len(segs) * TOKENS * SAMPLES_PER_TOKEN * 2
    a = np.frombuffer(long_pcm, "<i2").astype(np.int32)
    b = np.frombuffer(b"".join(parts), "<i2").astype(np.int32)
    # the decode worker may batch the concurrent segments (float rounding)
    assert np.abs(a - b).max() <= 2


def test_long_text_stream_equals_segments(server):
    """Streaming: segment after segment, each through its own decoder
    session, as the original streams sentence after sentence."""
    segs = zh_segments(ZH_LONG)
    streamed = ok(server, input=ZH_LONG, stream_format="audio")
    each = [
        ok(server, input=s, extra_args=AS_GIVEN, stream_format="audio") for s in segs
    ]
    assert streamed == b"".join(each)
    assert len(streamed) == len(segs) * TOKENS * SAMPLES_PER_TOKEN * 2

    body = ok(server, input=ZH_LONG, stream_format="sse")
    events = [
        json.loads(line[6:])
        for line in body.decode().splitlines()
        if line.startswith("data: ")
    ]
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["output_tokens"] == TOKENS * len(segs)
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert b"".join(base64.b64decode(e["audio"]) for e in deltas) == streamed


def test_long_text_opt_outs_and_errors(server):
    n = len(zh_segments(ZH_LONG))
    whole = ok(server, input=ZH_LONG, extra_args={"split_text": False})
    as_given = ok(server, input=ZH_LONG, extra_args=AS_GIVEN)
    assert len(whole) == len(as_given) == TOKENS * SAMPLES_PER_TOKEN * 2
    assert len(ok(server, input=ZH_LONG)) == n * len(whole)
    # English: sentences joined up to 80 tokens; short text is one segment
    assert len(ok(server, input="Hello world. Short text.")) == len(whole)
    for fields in (
        {"input": "?!…"},  # nothing left to speak
        {"input": "hello", "extra_args": {"split_text": "no"}},
    ):
        status, _, body = speak_long(server, **fields)
        assert status == 400, body
        assert "error" in json.loads(body)
