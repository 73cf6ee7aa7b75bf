# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""SoulX-Podcast end to end on CPU: ``vllm.entrypoints.openai.api_server``
on a tiny random release directory in the original format
(``tools/make_soulx_podcast_checkpoint.py``), called with the ``openai``
client and plain HTTP on ``/v1/audio/speech`` and ``/v1/audio/voices``.

A two-speaker script is one request: ``input`` holds ``[S1]..[S2]..`` and
``voices`` one voice per speaker. Each turn is one engine request in the
context of the turns before it; the greedy audio is checked against the
original's turn loop run here with HF transformers (the original's HF
engine processors) and decoded with the release's flow + HiFT.

One server for the module (engine start dominates).
"""

import base64
import io
import json
import os
import sys
import urllib.error
import urllib.request
from itertools import chain
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

REPO = Path(os.path.realpath(__file__)).parents[3]
sys.path.insert(0, str(REPO / "tools"))

SR = 24000
SAMPLES_PER_TOKEN = 960  # 25 Hz tokens, 24 kHz audio
TOKENS = 12  # max_new_tokens per turn
SCRIPT = "[S1]Hello everyone, welcome back.[S2]你好，很高兴来到这里[S1]Let us begin"
GREEDY = {"temperature": 0.0, "max_new_tokens": TOKENS}
# extra_args.dialect_prompt_text (one per voice), and after normalize_text
DIALECT = ["<|Sichuan|>要得要得 巴适得很", "<|Yue|>真係冇讲错啊"]
DIALECT_NORMALISED = ["<|Sichuan|>要得要得巴适得很。", "<|Yue|>真係冇讲错啊。"]


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    t = np.arange(2 * 16000) / 16000
    ref = 0.4 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 2 * t)
    soundfile.write(d / "ref.wav", ref.astype(np.float32), 16000)
    return d


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    from make_soulx_podcast_checkpoint import make_release_dir

    return make_release_dir(tmp_path_factory.mktemp("ckpt") / "SoulX-Podcast-tiny")


@pytest.fixture(scope="module")
def server(release_dir, tmp_path_factory, media_dir):
    from demo import serve

    voices = tmp_path_factory.mktemp("voices")
    with serve(
        release_dir,
        [
            "--dtype",
            "float32",
            "--max-model-len",
            "2048",
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
        yield {"base": base, "model": str(release_dir)}


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
    body = {
        "model": server["model"],
        "input": SCRIPT,
        "voice": "spk_a",
        "voices": ["spk_a", "spk_b"],
        "response_format": "pcm",
        **GREEDY,
    }
    body.update(fields)
    return post(server, "/v1/audio/speech", body)


def ok(server, **fields) -> bytes:
    status, _, body = speak(server, **fields)
    assert status == 200, body
    return body


def same_pcm(a: bytes, b: bytes) -> bool:
    """The same tokens decoded twice: equal up to a few LSB of int16 (the
    decoder's float sums may be batched differently from one call to the
    next); different tokens differ by far more."""
    x, y = np.frombuffer(a, np.int16), np.frombuffer(b, np.int16)
    return len(x) == len(y) and int(np.abs(x.astype(np.int32) - y).max()) <= 4


def _original_greedy_turns(release_dir, dialect=None):
    """The original's ``forward_longform`` LLM loop, greedy, with its HF
    engine's processors (min_new_tokens on the speech eos, repetition
    penalty 1.25 on the generated ids only) on HF transformers' Qwen3:
    the generated ids of every turn and their speakers.

    ``dialect`` (normalised dialect texts, ``use_dialect_prompt``): first
    each speaker's prompt is re-generated on its own, from the task token
    (speaker 0's prompt starts with it) + its zero-shot prompt + its dialect
    text between the speaker / text / semantic markers, with the same
    processors; the task token (speaker 0 only) + the dialect text + the
    generated ids then stand for that prompt."""
    from transformers import (
        AutoTokenizer,
        LogitsProcessorList,
        Qwen3ForCausalLM,
        RepetitionPenaltyLogitsProcessor,
    )

    tok = AutoTokenizer.from_pretrained(release_dir, use_fast=True)
    hf = Qwen3ForCausalLM.from_pretrained(release_dir, dtype=torch.float32).eval()
    presets = torch.load(release_dir / "spk2info.pt", weights_only=True)
    eos = tok.convert_tokens_to_ids("<|semantic_token_end|>")
    offset = 640
    prompts = []
    # the presets' transcripts, normalised (final mark added)
    for i, (name, text) in enumerate(
        [
            ("spk_a", "Hello everyone, welcome to our podcast."),
            ("spk_b", "哈喽，欢迎收听我们的节目。"),
        ]
    ):
        s = f"<|SPEAKER_{i}|><|text_start|>{text}<|text_end|><|semantic_token_start|>"
        s = "<|task_podcast|>" + s if i == 0 else s
        speech = [int(t) + offset for t in presets[name]["llm_prompt_speech_token"][0]]
        prompts.append(tok.encode(s) + speech + [eos])
    turns = [
        (0, "Hello everyone, welcome back."),
        (1, "你好，很高兴来到这里。"),
        (0, "Let us begin."),
    ]

    def generate(inputs):
        with torch.no_grad():
            return hf.generate(
                torch.tensor([inputs]),
                do_sample=False,
                max_new_tokens=TOKENS,
                min_new_tokens=8,
                eos_token_id=eos,
                pad_token_id=0,
                logits_processor=LogitsProcessorList(
                    [RepetitionPenaltyLogitsProcessor(1.25, len(inputs))]
                ),
            )[0, len(inputs) :].tolist()

    if dialect is not None:
        task = tok.encode("<|task_podcast|>")
        for i, text in enumerate(dialect):
            d = tok.encode(
                f"<|SPEAKER_{i}|><|text_start|>{text}<|text_end|>"
                "<|semantic_token_start|>"
            )
            gen = generate((task if i > 0 else []) + prompts[i] + d)
            prompts[i] = (task if i == 0 else []) + d + gen
    inputs = list(chain.from_iterable(prompts))  # < 10 turns, < 6192 tokens
    out = []
    for spk, text in turns:
        inputs += tok.encode(
            f"<|SPEAKER_{spk}|><|text_start|>{text}<|text_end|><|semantic_token_start|>"
        )
        gen = generate(inputs)
        inputs += gen
        ids = np.asarray(gen[: gen.index(eos)] if eos in gen else gen)
        out.append((spk, ids[(ids >= offset) & (ids < offset + 100)] - offset))
    return out


def test_two_speaker_script_equals_original_loop(client, server, release_dir):
    """The openai client gets a WAV of the whole dialogue: each turn
    generated in the context of the ones before, vocoded with its speaker's
    voice, turns concatenated; equal to the original loop + the release's
    flow + HiFT run here."""
    from vllm.model_executor.models.soulx_podcast import (
        SoulXPodcastSpeechDecoder,
        _preset_voice,
    )

    res = client.audio.speech.create(
        model=server["model"],
        voice="spk_a",
        input=SCRIPT,
        response_format="wav",
        extra_body={"voices": ["spk_a", "spk_b"], **GREEDY},
    )
    audio, sr = soundfile.read(io.BytesIO(res.content), dtype="float32")
    assert sr == SR and len(audio) > 0

    turns = _original_greedy_turns(release_dir)
    decoder = SoulXPodcastSpeechDecoder(str(release_dir), torch.device("cpu"))
    voices = [_preset_voice(str(release_dir), n) for n in ("spk_a", "spk_b")]
    wavs = decoder.decode(
        [ids.reshape(-1, 1) for _, ids in turns], [voices[spk] for spk, _ in turns]
    )
    want = np.concatenate(wavs)
    assert len(audio) == len(want) == sum(len(t) for _, t in turns) * SAMPLES_PER_TOKEN
    # 16-bit WAV; the server may batch the turns' flow passes (rounding)
    assert np.abs(audio - want).max() < 4 / 32768


def test_dialect_prompts_equal_original_loop(client, server, release_dir):
    """``extra_args.dialect_prompt_text``: the speakers' prompts are
    re-generated from their dialect texts before the dialogue and stand for
    the zero-shot prompts in every turn; the greedy WAV equals the
    original's loop with ``use_dialect_prompt`` + the release's flow + HiFT
    (conditioned on the zero-shot voices, as the original's flow is).
    Streaming runs the re-generation too."""
    from vllm.model_executor.models.soulx_podcast import (
        SoulXPodcastSpeechDecoder,
        _preset_voice,
    )

    body = {"voices": ["spk_a", "spk_b"], **GREEDY}
    body["extra_args"] = {"dialect_prompt_text": DIALECT}
    res = client.audio.speech.create(
        model=server["model"],
        voice="spk_a",
        input=SCRIPT,
        response_format="wav",
        extra_body=body,
    )
    audio, sr = soundfile.read(io.BytesIO(res.content), dtype="float32")
    assert sr == SR and len(audio) > 0

    turns = _original_greedy_turns(release_dir, DIALECT_NORMALISED)
    plain = _original_greedy_turns(release_dir)
    assert any(
        not np.array_equal(a, b) for (_, a), (_, b) in zip(turns, plain)
    )  # the re-generated prompts change the turns
    decoder = SoulXPodcastSpeechDecoder(str(release_dir), torch.device("cpu"))
    voices = [_preset_voice(str(release_dir), n) for n in ("spk_a", "spk_b")]
    wavs = decoder.decode(
        [ids.reshape(-1, 1) for _, ids in turns], [voices[spk] for spk, _ in turns]
    )
    want = np.concatenate(wavs)
    assert len(audio) == len(want) == sum(len(t) for _, t in turns) * SAMPLES_PER_TOKEN
    assert np.abs(audio - want).max() < 4 / 32768

    extra = {"dialect_prompt_text": DIALECT}
    one_shot = ok(server, extra_args=extra)
    assert not same_pcm(one_shot, ok(server))
    streamed = ok(server, extra_args=extra, stream_format="audio")
    assert len(streamed) == len(one_shot) == len(want) * 2
    # every text empty: as without dialect prompts (the original's rule)
    empty = ok(server, extra_args={"dialect_prompt_text": ["", ""]})
    assert same_pcm(empty, ok(server))


def test_seeded_sampling_and_voices_matter(server):
    a = ok(server, temperature=None, seed=11)
    assert same_pcm(a, ok(server, temperature=None, seed=11))
    assert not same_pcm(a, ok(server, temperature=None, seed=12))
    greedy = ok(server)
    swapped = ok(server, voices=["spk_b", "spk_a"])
    assert not same_pcm(swapped, greedy)


def test_streaming_and_sse(client, server):
    one_shot = ok(server)
    with client.audio.speech.with_streaming_response.create(
        model=server["model"],
        voice="spk_a",
        input=SCRIPT,
        response_format="pcm",
        extra_body={"voices": ["spk_a", "spk_b"], "stream_format": "audio", **GREEDY},
    ) as r:
        streamed = b"".join(r.iter_bytes())
    # chunked flow + HiFT cache per turn: the one-shot length, not its samples
    assert len(streamed) == len(one_shot) > 0
    body = ok(server, stream_format="sse")
    events = [
        json.loads(line[6:])
        for line in body.decode().splitlines()
        if line.startswith("data: ")
    ]
    assert events[-1]["type"] == "speech.audio.done"
    usage = events[-1]["usage"]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    pcm = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert len(pcm) == usage["output_tokens"] * SAMPLES_PER_TOKEN * 2 == len(one_shot)
    assert usage["input_tokens"] > 0


def test_registered_and_zero_shot_voices(server, media_dir):
    raw = (media_dir / "ref.wav").read_bytes()
    boundary = "soulxboundary"
    parts = [
        f"--{boundary}\r\nContent-Disposition: form-data; "
        f'name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in (("name", "alice"), ("ref_text", "a reference voice"))
    ]
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
    presets = ok(server)
    mixed = ok(server, voices=["alice", "spk_b"])
    assert mixed != presets and len(mixed) > 0
    # one speaker: `voice`, or ref_audio + ref_text, is S1's voice
    single = ok(server, input="[S1]Hello there", voices=None, voice="alice")
    zero_shot = ok(
        server,
        input="[S1]Hello there",
        voices=None,
        voice=None,
        ref_text="a reference voice",
        ref_audio=f"file://{media_dir / 'ref.wav'}",
    )
    assert single == zero_shot


@pytest.mark.parametrize(
    "fields,code,message",
    [
        ({"voices": ["spk_a", "nobody"]}, 404, "nobody"),
        ({"input": "[S1]a[S3]b"}, 400, "only 2 voice"),
        ({"input": "[S5]hello"}, 400, "unknown speaker tag"),
        ({"input": "hi [S1]hello"}, 400, "before the first speaker tag"),
        ({"input": "[S1]a [laugh] b"}, 400, "brackets"),
        ({"input": "[S1]   [S2]b"}, 400, "empty turn"),
        ({"voices": None, "voice": "default"}, 400, "needs a voice"),
        ({"voices": ["spk_a"] * 5}, 400, "at most 4"),
        ({"voices": []}, 400, "voices"),
        (
            {"extra_args": {"dialect_prompt_text": ["<|Sichuan|>好"]}},
            400,
            "1 text(s) for 2 speaker voice(s)",
        ),
        (
            {"extra_args": {"dialect_prompt_text": ["Sichuan 好", ""]}},
            400,
            "must start with a dialect tag",
        ),
        (
            {"extra_args": {"dialect_prompt_text": "<|Sichuan|>好"}},
            400,
            "must be a list",
        ),
        ({"extra_args": {"dialect_prompt_text": [1, 2]}}, 400, "must be a list"),
        (
            {"extra_args": {"dialect_prompt_text": ["<|Yue|>", ""]}},
            400,
            "has no text",
        ),
    ],
)
def test_bad_requests(server, fields, code, message):
    status, _, body = speak(server, **fields)
    assert status == code, body
    err = json.loads(body)
    assert "error" in err and message in json.dumps(err, ensure_ascii=False), err
