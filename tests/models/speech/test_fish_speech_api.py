# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Fish Speech (S1 layout) end to end through ``/v1/audio/speech`` on CPU.

One OpenAI-compatible server runs a tiny random OpenAudio-S1 release
directory (``model.pth`` + ``config.json`` + ``tokenizer.tiktoken`` +
``special_tokens.json`` + a modded-DAC ``codec.pth``), exactly as released.
The audio the ``openai`` client gets back must equal the original pipeline
(fish_speech 0.1.0: ``ContentSequence`` prompt, ``generate`` loop, DAC
``decode``) on the same files, for a plain prompt and for zero-shot cloning
from a reference WAV (DAC ``encode`` of the reference).
"""

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

HERE = Path(__file__).resolve().parent
REPO = Path(os.path.realpath(__file__)).parents[3]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(HERE))

TEXT = "hello the world and the rest"
REF_TEXT = "and this is the reference"
FRAMES = 20
RP = 1.2
SR = 44100


@pytest.fixture(scope="module")
def fish_dir(tmp_path_factory):
    from make_fish_checkpoint import make_s1
    from make_fish_codec import make_s1_codec

    out = tmp_path_factory.mktemp("fish") / "openaudio-s1-tiny"
    make_s1(
        out, seed=0, dtype=torch.float32, dims={"num_codebooks": 10}, codebook_size=4096
    )
    make_s1_codec(out / "codec.pth", seed=0)
    return out


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    t = np.arange(SR) / SR
    ref = 0.4 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)
    soundfile.write(d / "ref.wav", ref.astype(np.float32), SR)
    return d


@pytest.fixture(scope="module")
def server(fish_dir, media_dir):
    from demo import serve

    with serve(
        fish_dir,
        [
            "--dtype",
            "float32",
            "--max-model-len",
            "512",
            "--max-num-seqs",
            "4",
            "--kv-cache-memory-bytes",
            str(64 << 20),
            "--enforce-eager",
            "--allowed-local-media-path",
            str(media_dir),
        ],
    ) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="EMPTY")


@pytest.fixture(scope="module")
def reference(fish_dir):
    from make_fish_checkpoint import import_reference_llama

    from vllm.model_executor.models.fish_speech_codec import FishDAC

    llama = import_reference_llama()
    lm = llama.DualARTransformer.from_pretrained(str(fish_dir), load_weights=True)
    # the codec: our loader is parity-tested against fish_speech's DAC in
    # test_fish_codec.py; here the LM half is the original code
    codec = FishDAC.from_pretrained(fish_dir / "codec.pth")
    return lm.float().eval(), codec


def _reference_audio(reference, refs=()) -> np.ndarray:
    from test_fish_speech import _encode, _ref_generate

    lm, codec = reference
    y = _ref_generate(lm, _encode(lm, TEXT, refs), FRAMES, RP)
    im_end = lm.tokenizer.get_token_id("<|im_end|>")
    keep = y[0] != im_end
    codes = y[1:, keep].long()
    with torch.no_grad():
        return codec.decode(codes[None])[0, 0].numpy()


def _speak(client, **extra):
    resp = client.audio.speech.create(
        model="",
        input=TEXT,
        voice="default",
        response_format="flac",
        extra_body={
            **dict(temperature=0.0, repetition_penalty=RP, max_new_tokens=FRAMES),
            **extra,
        },
    )
    audio, sr = soundfile.read(io.BytesIO(resp.content), dtype="float32")
    assert sr == SR
    return audio


def test_speech_equals_original_pipeline(client, reference):
    audio = _speak(client)
    expected = _reference_audio(reference)
    assert audio.size == expected.size and audio.size % 2048 == 0
    # FLAC is 16-bit: compare within its quantization step
    np.testing.assert_allclose(audio, expected, atol=1e-3)


def test_streaming_equals_one_shot(client):
    one_shot = _speak(client)
    pcm = bytearray()
    with client.audio.speech.with_streaming_response.create(
        model="",
        input=TEXT,
        voice="default",
        response_format="pcm",
        extra_body=dict(
            stream_format="audio",
            temperature=0.0,
            repetition_penalty=RP,
            max_new_tokens=FRAMES,
        ),
    ) as resp:
        for chunk in resp.iter_bytes():
            pcm += chunk
    streamed = np.frombuffer(bytes(pcm), dtype="<i2").astype(np.float32) / 32768
    assert streamed.size == one_shot.size
    np.testing.assert_allclose(streamed, one_shot, atol=2e-3)


def test_zero_shot_equals_original_pipeline(client, reference, media_dir):
    from vllm.entrypoints.text_to_speech.audio import load_reference_audio

    audio = _speak(
        client, ref_audio=f"file://{media_dir / 'ref.wav'}", ref_text=REF_TEXT
    )
    _, codec = reference
    wav = load_reference_audio((media_dir / "ref.wav").read_bytes(), SR, 60.0)
    with torch.no_grad():
        ref_codes = codec.encode(torch.from_numpy(wav)[None])[0].int()
    expected = _reference_audio(reference, [(REF_TEXT, ref_codes)])
    assert audio.size == expected.size
    np.testing.assert_allclose(audio, expected, atol=1e-3)
    assert not np.allclose(audio, _speak(client)), "the reference had no effect"


def test_seeded_sampling_reproducible(client):
    a = _speak(client, temperature=0.8, seed=7)
    b = _speak(client, temperature=0.8, seed=7)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "fields, needle",
    [
        (dict(ref_audio="file:///etc/passwd", ref_text="x"), "allowed"),
        (dict(ref_audio="bm90IGF1ZGlv", ref_text="x"), "unsupported audio"),
        (dict(ref_audio="bm90IGF1ZGlv"), "ref_text"),
        (dict(input=""), "input"),
        (dict(voice="nobody"), "does not exist"),
    ],
)
def test_bad_input(server, fields, needle):
    import json
    import urllib.error
    import urllib.request

    body = dict(input=TEXT, voice="default", max_new_tokens=4)
    body.update(fields)
    req = urllib.request.Request(
        server + "/v1/audio/speech",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert 400 <= e.value.code < 500
    assert needle in e.value.read().decode()
