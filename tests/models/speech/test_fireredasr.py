# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""FireRedASR (v1) in vLLM against the original implementation (PyPI
``fireredasr==0.0.2``) on small random checkpoints in the release format.

The checkpoints come from ``tools/make_fireredasr_checkpoint.py``, which builds
them with the reference classes themselves. vLLM loads the release directory
as published (no conversion).
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

REPO = Path(os.path.realpath(__file__)).parents[3]
sys.path.insert(0, str(REPO / "tools"))

from fireredasr.data.asr_feat import ASRFeatExtractor  # noqa: E402
from fireredasr.models.fireredasr_aed import FireRedAsrAed  # noqa: E402
from fireredasr.tokenizer.aed_tokenizer import (  # noqa: E402
    ChineseCharEnglishSpmTokenizer,
)

SR = 16000

# One in-process engine serves the whole module: keep vLLM's conftest from
# tearing down its distributed state after each test.
pytestmark = pytest.mark.skip_global_cleanup


def make_audio(seconds: float, seed: int) -> np.ndarray:
    """A gliding tone with amplitude modulation and a little noise, int16."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    f = 200 + 150 * np.sin(2 * np.pi * 0.7 * t) + rng.uniform(0, 400)
    x = (
        0.3
        * np.sin(2 * np.pi * np.cumsum(f) / SR)
        * (0.5 + 0.5 * np.sin(2 * np.pi * 1.3 * t))
    )
    x += 0.02 * rng.standard_normal(t.size)
    return (x * 32767).astype(np.int16)


def load_reference_aed(ckpt: Path) -> FireRedAsrAed:
    """``load_fireredasr_aed_model`` of the original, with ``argparse.Namespace``
    allow-listed (torch>=2.6 defaults to weights_only=True, which the original
    code does not handle)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        package = torch.load(ckpt / "model.pth.tar", map_location="cpu")
    model = FireRedAsrAed.from_args(package["args"])
    model.load_state_dict(package["model_state_dict"], strict=True)
    return model.eval()


class Reference:
    """The original AED pipeline: features, encoder, greedy (beam 1) decoding."""

    def __init__(self, ckpt: Path):
        self.model = load_reference_aed(ckpt)
        self.feat = ASRFeatExtractor(str(ckpt / "cmvn.ark"))
        self.tok = ChineseCharEnglishSpmTokenizer(
            str(ckpt / "dict.txt"), str(ckpt / "train_bpe1000.model")
        )

    def features(self, wav: Path):
        feats, lengths, _ = self.feat([str(wav)])
        return feats, lengths

    @torch.no_grad()
    def encode(self, wav: Path):
        feats, lengths = self.features(wav)
        enc, enc_lens, mask = self.model.encoder(feats, lengths)
        return enc, enc_lens, mask

    @torch.no_grad()
    def greedy(self, wav: Path, decode_max_len: int = 0):
        feats, lengths = self.features(wav)
        hyps = self.model.transcribe(
            feats, lengths, 1, 1, decode_max_len, 1.0, 0.0, 1.0
        )
        ids = [int(i) for i in hyps[0][0]["yseq"]]
        return ids, self.tok.detokenize(ids)

    @torch.no_grad()
    def greedy_array(self, samples: np.ndarray, sr: int = SR):
        """Greedy run on int16-scale samples, through the original's own
        fbank and CMVN classes (``ASRFeatExtractor`` minus the file reading)."""
        fbank = self.feat.cmvn(self.feat.fbank((sr, samples)))
        feats = torch.from_numpy(fbank).float()[None]
        lengths = torch.tensor([feats.size(1)])
        hyps = self.model.transcribe(feats, lengths, 1, 1, 0, 1.0, 0.0, 1.0)
        ids = [int(i) for i in hyps[0][0]["yseq"]]
        return ids, self.tok.detokenize(ids)

    @torch.no_grad()
    def step_logprobs(self, wav: Path, ids: list[int]) -> torch.Tensor:
        """log_softmax of the decoder at every step of the hypothesis ``ids``
        (teacher forced over [sos] + ids; causal, so equal to the step-wise
        recomputation of ``batch_beam_search``)."""
        enc, _, mask = self.encode(wav)
        dec = self.model.decoder
        ys = torch.tensor([[dec.sos_id] + ids])
        tgt_mask = dec.ignored_target_position_is_0(ys, dec.pad_id)
        x = dec.tgt_word_emb(ys) * dec.scale + dec.positional_encoding(ys)
        for layer in dec.layer_stack:
            x = layer(x, enc, tgt_mask, mask)
        logits = dec.tgt_word_prj(dec.layer_norm_out(x))
        return torch.log_softmax(logits[0], dim=-1)


@pytest.fixture(scope="module")
def aed_ckpt(tmp_path_factory) -> Path:
    from make_fireredasr_checkpoint import make_aed

    return make_aed(tmp_path_factory.mktemp("fireredasr") / "FireRedASR-AED-L")


@pytest.fixture(scope="module")
def wavs(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("wavs")
    paths = []
    for i, sec in enumerate([2.0, 3.3, 4.0]):
        p = out / f"utt{i}.wav"
        sf.write(p, make_audio(sec, i), SR, subtype="PCM_16")
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def ref(aed_ckpt) -> Reference:
    return Reference(aed_ckpt)


@pytest.fixture(scope="module")
def aed_llm(aed_ckpt):
    from vllm import LLM

    # In-process engine, so that apply_model can hand tensors back.
    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        llm = LLM(
            model=str(aed_ckpt),
            dtype="float32",
            enforce_eager=True,
            max_model_len=1024,
            max_num_seqs=4,
            max_logprobs=128,
            kv_cache_memory_bytes=64 << 20,
        )
        yield llm
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old


def read_float(wav: Path) -> np.ndarray:
    x, sr = sf.read(wav, dtype="float32")
    assert sr == SR
    return x


def aed_prompt(audio: np.ndarray, sos_id: int = 3) -> dict:
    return {
        "encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (audio, SR)}},
        "decoder_prompt": {"prompt_token_ids": [sos_id]},
    }


def test_release_dir_config(aed_ckpt):
    from vllm.transformers_utils.config import get_config

    cfg = get_config(str(aed_ckpt), trust_remote_code=False)
    assert cfg.architectures == ["FireRedASRAEDForConditionalGeneration"]
    assert cfg.is_encoder_decoder
    assert (cfg.d_model, cfg.n_head, cfg.n_layers_enc, cfg.n_layers_dec) == (
        128,
        2,
        2,
        2,
    )
    assert (cfg.sos_id, cfg.eos_id, cfg.pad_id) == (3, 4, 2)
    assert cfg.vocab_size == len((aed_ckpt / "dict.txt").read_text().splitlines())


def test_tokenizer_matches_original(aed_ckpt, ref):
    from vllm.tokenizers.fireredasr import FireRedASRTokenizer
    from vllm.tokenizers.registry import get_tokenizer

    tok = get_tokenizer(str(aed_ckpt))
    assert isinstance(tok, FireRedASRTokenizer)
    text = "你好 hello world 今天天气 the quick fox"
    assert tok.encode(text) == ref.tok.tokenize(text)[1]
    ids = list(range(len(tok)))
    assert tok.decode(ids) == ref.tok.detokenize(ids)


def test_features_match_original(aed_ckpt, ref, wavs):
    from vllm.model_executor.models.fireredasr_aed import (
        build_feature_extractor,
        extract_features,
    )

    fe = build_feature_extractor(aed_ckpt, 60.0)
    for wav in wavs:
        want, lengths = ref.features(wav)
        got = extract_features(fe, [read_float(wav)])
        assert got["input_features"].shape == want.shape
        torch.testing.assert_close(got["input_features"], want, rtol=1e-5, atol=1e-4)
        assert int(got["speech_lengths"][0]) == int(lengths[0])
        # encoder frames the prompt is expanded to
        _, enc_lens, _ = ref.encode(wav)
        assert int(got["fake_token_lengths"][0]) == int(enc_lens[0])


def test_encoder_matches_original(aed_llm, ref, wavs):
    for wav in wavs:
        feats, lengths = ref.features(wav)
        want, want_lens, _ = ref.encode(wav)

        def run(model, feats=feats, lengths=lengths):
            with torch.no_grad():
                out, lens = model.model.get_encoder_outputs(
                    feats, lengths.to(torch.int32)
                )
            return out.cpu(), lens.cpu()

        got, got_lens = aed_llm.apply_model(run)[0]
        assert got_lens.tolist() == want_lens.tolist()
        n = int(want_lens[0])
        torch.testing.assert_close(got[:, :n], want[:, :n], rtol=1e-3, atol=1e-4)


def test_greedy_matches_original(aed_llm, ref, wavs):
    """Batched requests of different lengths; each equals the original's
    greedy (beam 1) run alone: token ids, text and every step's log-probs."""
    from vllm import SamplingParams

    vocab = len(ref.tok.dict)
    # The original decodes at most as many tokens as there are encoder frames.
    params = [
        SamplingParams(
            temperature=0.0, max_tokens=ref.encode(w)[0].size(1), logprobs=vocab
        )
        for w in wavs
    ]
    outs = aed_llm.generate([aed_prompt(read_float(w)) for w in wavs], params)
    eos = ref.model.eos_id
    stopped = 0
    seen: set[int] = set()
    for wav, out, p in zip(wavs, outs, params):
        want_ids, want_text = ref.greedy(wav)
        got = out.outputs[0]
        ids = list(got.token_ids)
        if got.finish_reason == "stop":
            stopped += 1
            assert ids[-1] == eos
            ids = ids[:-1]
        else:
            assert len(ids) == p.max_tokens
        assert ids == want_ids
        seen.update(want_ids)
        assert got.text.strip() == want_text
        ref_lp = ref.step_logprobs(wav, want_ids)  # [len+1, vocab]
        assert len(got.logprobs) == len(got.token_ids)
        for step, lp in enumerate(got.logprobs):
            got_lp = torch.tensor([lp[t].logprob for t in range(vocab)])
            torch.testing.assert_close(got_lp, ref_lp[step], rtol=1e-3, atol=1e-4)
    assert stopped >= 2  # <eos> ends hypotheses as in the original
    assert len(seen) >= 4  # the random checkpoint is not degenerate


def test_max_tokens_matches_decode_max_len(aed_llm, ref, wavs):
    from vllm import SamplingParams

    want_ids, want_text = ref.greedy(wavs[2], decode_max_len=4)
    out = aed_llm.generate(
        [aed_prompt(read_float(wavs[2]))], SamplingParams(temperature=0.0, max_tokens=4)
    )
    assert list(out[0].outputs[0].token_ids) == want_ids
    assert out[0].outputs[0].text.strip() == want_text


# ---------------------------------------------------------------------------
# /v1/audio/transcriptions with the official openai client
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aed_server(aed_ckpt, tmp_path_factory):
    import openai
    from demo import serve

    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = [
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "2048",
        "--max-num-seqs",
        "4",
        "--kv-cache-memory-bytes",
        str(64 << 20),
    ]
    with serve(aed_ckpt, args, log_path=log) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="EMPTY", max_retries=0)


def encode(samples: np.ndarray, sr: int, fmt: str = "WAV", subtype: str = "PCM_16"):
    import io

    buf = io.BytesIO()
    sf.write(buf, samples, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def transcribe(client, name: str, data: bytes, fmt: str = "json", **kw):
    return client.audio.transcriptions.create(
        model=client.models.list().data[0].id,
        file=(name, data),
        response_format=fmt,
        **kw,
    )


def test_api_json_and_text(aed_server, ref, wavs):
    import json

    for wav in wavs:
        _, want = ref.greedy(wav)
        data = wav.read_bytes()
        assert transcribe(aed_server, wav.name, data).text == want
        # vLLM answers response_format=text with its JSON body (as for Whisper)
        body = transcribe(aed_server, wav.name, data, fmt="text")
        assert json.loads(body)["text"] == want


def test_api_verbose_json_segment(aed_server, ref, wavs):
    wav = wavs[1]
    want_ids, want = ref.greedy(wav)
    r = transcribe(aed_server, wav.name, wav.read_bytes(), fmt="verbose_json")
    dur = sf.info(wav).frames / SR
    assert r.text == want
    assert float(r.duration) == pytest.approx(dur)
    assert len(r.segments) == 1
    seg = r.segments[0]
    assert (seg.id, seg.start, seg.seek) == (0, 0.0, 0)
    assert seg.end == pytest.approx(dur)
    assert seg.text == want and list(seg.tokens) == want_ids
    assert seg.avg_logprob < 0


def test_api_output_bounded_like_original(aed_server, ref):
    """A pure tone gets no <eos> from the random model: the original stops at
    one token per encoder frame, and so does the server (not max_model_len)."""
    t = np.arange(2 * SR) / SR
    tone = (0.3 * 32767 * np.sin(2 * np.pi * 300 * t)).astype(np.int16)
    want_ids, want = ref.greedy_array(tone.astype(np.float64))
    r = transcribe(aed_server, "tone.wav", encode(tone, SR), fmt="verbose_json")
    assert want_ids[-1] != ref.model.eos_id and len(want_ids) == 50
    assert list(r.segments[0].tokens) == want_ids
    assert r.text == want


def test_api_long_audio_split_and_stitched(aed_server, ref):
    """76 s > the AED's 60 s limit: split at the quiet part near 60 s, each
    chunk transcribed as the original would, texts joined in order."""
    from vllm.multimodal.audio import split_audio

    audio = np.concatenate(
        [
            make_audio(59.3, 7),
            np.zeros(int(0.5 * SR), np.int16),
            make_audio(16.2, 8),
        ]
    )
    x = audio.astype(np.float32) / 32768.0
    chunks = split_audio(
        x, SR, max_clip_duration_s=60, overlap_duration_s=1, min_energy_window_size=1600
    )
    assert len(chunks) == 2 and 59.3 * SR <= len(chunks[0]) <= 59.8 * SR
    wants = [ref.greedy_array(c.astype(np.float64) * 32768.0) for c in chunks]

    data = encode(audio, SR)
    for lang, sep in [(None, " "), ("zh", "")]:
        kw = {"language": lang} if lang else {}
        r = transcribe(aed_server, "long.wav", data, fmt="verbose_json", **kw)
        assert [s.text for s in r.segments] == [w[1] for w in wants]
        assert [list(s.tokens) for s in r.segments] == [w[0] for w in wants]
        assert r.text == sep.join(w[1] for w in wants)
        b = len(chunks[0]) / SR
        assert [(s.start, s.end) for s in r.segments] == [
            (0.0, pytest.approx(b)),
            (pytest.approx(b), pytest.approx(len(audio) / SR)),
        ]
        assert transcribe(aed_server, "long.wav", data, **kw).text == r.text


@pytest.mark.parametrize(
    "sr,fmt,subtype,channels",
    [
        (16000, "FLAC", "PCM_16", 1),
        (8000, "WAV", "PCM_16", 1),
        (44100, "FLAC", "PCM_24", 1),
        (22050, "OGG", "VORBIS", 1),
        (16000, "WAV", "FLOAT", 2),
    ],
)
def test_api_sample_rates_and_formats(aed_server, ref, sr, fmt, subtype, channels):
    """Any rate/format the server decodes is resampled to 16 kHz mono; the
    transcript equals the original's on that 16 kHz signal."""
    import io

    from vllm.multimodal.media.audio import load_audio

    base = make_audio(3.0, 11).astype(np.float32) / 32768.0
    n = int(len(base) * sr / SR)
    x = np.interp(np.arange(n) * SR / sr, np.arange(len(base)), base).astype(np.float32)
    if channels == 2:
        x = np.stack([x, 0.5 * x], axis=1)
    data = encode(x, sr, fmt, subtype)
    y, y_sr = load_audio(io.BytesIO(data), sr=SR)
    assert y_sr == SR and y.ndim == 1
    _, want = ref.greedy_array(y.astype(np.float64) * 32768.0)
    assert transcribe(aed_server, f"a.{fmt.lower()}", data).text == want


@pytest.mark.parametrize(
    "name,data",
    [
        ("garbage.wav", b"this is not audio" * 64),
        ("empty.wav", b""),
        ("truncated.wav", encode(make_audio(1.0, 0), SR)[:40]),
        ("short.wav", encode(make_audio(0.01, 0), SR)),
    ],
)
def test_api_bad_audio_is_4xx(aed_server, wavs, ref, name, data):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        transcribe(aed_server, name, data)
    assert 400 <= e.value.status_code < 500
    # the server is still serving
    assert (
        transcribe(aed_server, wavs[0].name, wavs[0].read_bytes()).text
        == ref.greedy(wavs[0])[1]
    )
