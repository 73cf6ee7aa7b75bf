# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Long text over ``/v1/audio/speech`` (CosyVoice2, tiny random release
directory, CPU): the original frontend's sentence splitting makes one LM
request per segment (``split_speech_text``, ``cosyvoice_frontend.py``; the
splitter itself is checked against the original in
``test_cosyvoice_frontend.py``). One server for the module.
"""

import base64
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(os.path.realpath(__file__)).parents[3]
sys.path.insert(0, str(REPO / "tools"))

SAMPLES_PER_TOKEN = 960  # 25 Hz tokens, 24 kHz audio
TOKENS = 20  # max_new_tokens: with greedy decoding every segment runs to it
ZH_LONG = (
    "今天天气很好，我们一起去公园散步吧！你觉得怎么样？"
    "我说：“好的。”他说：“那我们走吧！”公园里有很多花，红的、黄的、白的都有。"
) * 3 + "最后，我们回家了"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from demo import serve
    from make_cosyvoice2_checkpoint import make_release_dir

    ckpt = make_release_dir(tmp_path_factory.mktemp("ckpt") / "CosyVoice2-tiny")
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
        ],
    ) as base:
        yield {"base": base, "model": str(ckpt)}


def speak(server, **fields):
    body = {
        "model": server["model"],
        "voice": "spk_a",
        "response_format": "pcm",
        "temperature": 0.0,
        "max_new_tokens": TOKENS,
        **fields,
    }
    req = urllib.request.Request(
        server["base"] + "/v1/audio/speech",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def ok(server, **fields) -> bytes:
    status, body = speak(server, **fields)
    assert status == 200, body
    return body


def zh_segments(text):
    from vllm.model_executor.models.cosyvoice_frontend import text_normalize

    return text_normalize(text, len)  # zh lengths count characters


AS_GIVEN = {"text_frontend": False}


def test_one_shot_equals_segments(server):
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


def test_stream_equals_segments(server):
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


def test_opt_outs_and_errors(server):
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
        status, body = speak(server, **fields)
        assert status == 400, body
        assert "error" in json.loads(body)
