# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""FireRedASR-LLM-L (v1) in vLLM against the original (PyPI ``fireredasr==0.0.2``,
with ``peft`` for its LoRA) on a small random checkpoint in the release layout:
model.pth.tar (encoder + projector + LoRA), asr_encoder.pth.tar, cmvn.ark and a
tiny Qwen2 as Qwen2-7B-Instruct/. Reference in fp32 (``use_fp16=0``), greedy,
repetition_penalty 1.0.
"""

import argparse
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

REPO = Path(os.path.realpath(__file__)).parents[3]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(Path(os.path.realpath(__file__)).parent))

from fireredasr.data.asr_feat import ASRFeatExtractor  # noqa: E402
from fireredasr.models.fireredasr_llm import FireRedAsrLlm  # noqa: E402
from fireredasr.tokenizer.llm_tokenizer import LlmTokenizerWrapper  # noqa: E402
from test_fireredasr import SR, make_audio  # noqa: E402

pytestmark = pytest.mark.skip_global_cleanup

# LlmTokenizerWrapper.preprocess_texts(decode=True)'s template. Its
# apply_chat_template(tokenize=True) call returns a BatchEncoding under
# transformers 5, which the original then fails to pad; the same template
# is applied here with return_dict=False.
DECODE_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content']}}{% if loop.last %}{{''}}{% else %}{{ '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
)


def same_text(got: str, want: str) -> bool:
    """A random byte-level model may end on an incomplete UTF-8 sequence:
    vLLM's incremental detokenizer holds it back where HF prints U+FFFD."""
    return got == want or got == want.rstrip("\ufffd")


class Reference:
    def __init__(self, ckpt: Path):
        # load_firered_llm_model_and_tokenizer, with argparse.Namespace
        # allow-listed for torch.load's weights_only default.
        with torch.serialization.safe_globals([argparse.Namespace]):
            package = torch.load(ckpt / "model.pth.tar", map_location="cpu")
            package["args"].encoder_path = str(ckpt / "asr_encoder.pth.tar")
            package["args"].llm_dir = str(ckpt / "Qwen2-7B-Instruct")
            self.model = FireRedAsrLlm.from_args(package["args"])
        res = self.model.load_state_dict(package["model_state_dict"], strict=False)
        assert not res.unexpected_keys
        assert all(k.startswith("llm.") and "lora_" not in k for k in res.missing_keys)
        self.model.eval()
        self.tok = LlmTokenizerWrapper.build_llm_tokenizer(package["args"].llm_dir)
        self.feat = ASRFeatExtractor(str(ckpt / "cmvn.ark"))
        msg = [
            {"role": "user", "content": "<speech>请转写音频为文字"},
            {"role": "assistant", "content": ""},
        ]
        ids = self.tok.apply_chat_template(
            msg,
            tokenize=True,
            chat_template=DECODE_TEMPLATE,
            add_generation_prompt=False,
            return_dict=False,
        )
        self.input_ids = torch.tensor([ids])
        self.attention_mask = self.input_ids.ne(self.tok.pad_token_id)

    def features(self, samples: np.ndarray):
        fbank = self.feat.cmvn(self.feat.fbank((SR, samples)))
        feats = torch.from_numpy(fbank).float()[None]
        return feats, torch.tensor([feats.size(1)])

    @torch.no_grad()
    def greedy(self, samples: np.ndarray):
        feats, lengths = self.features(samples)
        out = self.model.transcribe(
            feats, lengths, self.input_ids, self.attention_mask, 1, 0, 0, 1.0, 1.0, 1.0
        )
        ids = [int(i) for i in out[0]]
        return ids, self.tok.batch_decode(out, skip_special_tokens=True)[0]

    @torch.no_grad()
    def num_speech(self, samples: np.ndarray) -> int:
        feats, lengths = self.features(samples)
        enc, enc_lens, _ = self.model.encoder(feats, lengths)
        return self.model.encoder_projector(enc, enc_lens)[0].size(1)

    @torch.no_grad()
    def step_logprobs(self, samples: np.ndarray, ids: list[int]) -> torch.Tensor:
        """log_softmax at every generated position (teacher forced)."""
        m = self.model
        feats, lengths = self.features(samples)
        enc, enc_lens, _ = m.encoder(feats, lengths)
        speech, speech_lens = m.encoder_projector(enc, enc_lens)
        emb = m.llm.get_input_embeddings()(self.input_ids)
        emb, _, _ = m._merge_input_ids_with_speech_features(
            speech.to(emb.dtype),
            emb,
            self.input_ids,
            self.attention_mask,
            speech_lens=speech_lens,
        )
        gen = m.llm.get_input_embeddings()(torch.tensor([ids]))
        logits = m.llm(inputs_embeds=torch.cat([emb, gen], 1)).logits[0]
        n = emb.size(1)
        return torch.log_softmax(logits[n - 1 : n - 1 + len(ids)].float(), -1)


@pytest.fixture(scope="module")
def llm_ckpt(tmp_path_factory) -> Path:
    from make_fireredasr_checkpoint import make_llm

    return make_llm(tmp_path_factory.mktemp("fireredasr_llm") / "FireRedASR-LLM-L")


@pytest.fixture(scope="module")
def ref(llm_ckpt) -> Reference:
    return Reference(llm_ckpt)


@pytest.fixture(scope="module")
def audios() -> list[np.ndarray]:
    return [
        make_audio(sec, i).astype(np.float64) for i, sec in enumerate([2.0, 3.0, 4.1])
    ]


@pytest.fixture(scope="module")
def engine(llm_ckpt):
    from vllm import LLM

    return LLM(
        model=str(llm_ckpt),
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        max_num_seqs=4,
        max_logprobs=1024,
        kv_cache_memory_bytes=64 << 20,
    )


def test_release_dir_config_and_prompt(llm_ckpt, ref):
    from vllm.model_executor.models.fireredasr_llm import encode_prompt
    from vllm.tokenizers.registry import get_tokenizer
    from vllm.transformers_utils.config import get_config

    cfg = get_config(str(llm_ckpt), trust_remote_code=False)
    assert cfg.architectures == ["FireRedASRLLMForConditionalGeneration"]
    assert cfg.audio_encoder_conf["d_model"] == 128
    assert cfg.encoder_downsample_rate == 2 and cfg.hidden_size == 128
    tok = get_tokenizer(str(llm_ckpt))
    # the original's prompt ids, <speech> = the id the original adds
    assert encode_prompt(tok) == ref.input_ids[0].tolist()
    assert ref.tok.convert_tokens_to_ids("<speech>") == len(tok)


def test_greedy_matches_original(engine, ref, audios):
    """Batched requests; each equals the original's greedy run alone (ids,
    text, per-step log-probs over the whole vocabulary)."""
    from vllm import SamplingParams
    from vllm.model_executor.models.fireredasr_llm import encode_prompt

    prompt_ids = encode_prompt(engine.get_tokenizer())
    vocab = engine.llm_engine.model_config.get_vocab_size()
    params = [
        SamplingParams(temperature=0.0, max_tokens=ref.num_speech(a), logprobs=vocab)
        for a in audios
    ]
    prompts = [
        {
            "prompt_token_ids": prompt_ids,
            "multi_modal_data": {"audio": (a.astype(np.float32) / 32768.0, SR)},
        }
        for a in audios
    ]
    outs = engine.generate(prompts, params)
    for a, out, p in zip(audios, outs, params):
        want_ids, want_text = ref.greedy(a)
        got = out.outputs[0]
        ids = list(got.token_ids)
        if got.finish_reason == "stop":
            ids = ids[:-1] if ids and ids[-1] == ref.tok.eos_token_id else ids
        else:
            assert len(ids) == p.max_tokens
        assert ids == want_ids
        assert same_text(got.text, want_text)
        ref_lp = ref.step_logprobs(a, list(got.token_ids))
        for step, lp in enumerate(got.logprobs):
            got_lp = torch.tensor([lp[t].logprob for t in range(vocab)])
            torch.testing.assert_close(
                got_lp[: ref_lp.size(1)], ref_lp[step], rtol=1e-3, atol=1e-4
            )
    assert len({t for o in outs for t in o.outputs[0].token_ids}) >= 5


@pytest.fixture(scope="module")
def llm_server(llm_ckpt, tmp_path_factory):
    import openai
    from demo import serve

    log = tmp_path_factory.mktemp("serve_llm") / "server.log"
    args = [
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "1024",
        "--max-num-seqs",
        "4",
        "--kv-cache-memory-bytes",
        str(64 << 20),
    ]
    with serve(llm_ckpt, args, log_path=log) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="EMPTY", max_retries=0)


def _wav(samples: np.ndarray, sr: int = SR, fmt: str = "WAV", subtype: str = "PCM_16"):
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def _transcribe(client, data: bytes, fmt: str = "json", name: str = "a.wav", **kw):
    return client.audio.transcriptions.create(
        model=client.models.list().data[0].id,
        file=(name, data),
        response_format=fmt,
        **kw,
    )


def test_api_json_verbose(llm_server, ref, audios):
    import json

    a = audios[1]
    want_ids, want = ref.greedy(a)
    data = _wav(a.astype(np.int16))
    assert same_text(_transcribe(llm_server, data).text, want)
    assert same_text(
        json.loads(_transcribe(llm_server, data, fmt="text"))["text"], want
    )
    r = _transcribe(llm_server, data, fmt="verbose_json")
    assert same_text(r.text, want) and len(r.segments) == 1
    seg = r.segments[0]
    assert (seg.start, seg.end) == (0.0, pytest.approx(len(a) / SR))
    assert list(seg.tokens) == want_ids


def test_api_long_audio_split(llm_server, ref):
    """38 s > the LLM's 30 s limit: two chunks, each as the original."""
    from vllm.multimodal.audio import split_audio

    audio = np.concatenate(
        [make_audio(29.4, 21), np.zeros(int(0.4 * SR), np.int16), make_audio(8.2, 22)]
    )
    chunks = split_audio(audio.astype(np.float32) / 32768.0, SR, 30, 1, 1600)
    assert len(chunks) == 2
    wants = [ref.greedy(c.astype(np.float64) * 32768.0) for c in chunks]
    r = _transcribe(llm_server, _wav(audio), fmt="verbose_json", language="zh")
    assert [list(s.tokens) for s in r.segments] == [w[0] for w in wants]
    assert r.text == "".join(s.text for s in r.segments)
    assert all(same_text(s.text, w[1]) for s, w in zip(r.segments, wants))
    assert r.segments[1].start == pytest.approx(len(chunks[0]) / SR)


def test_api_resampled_format(llm_server, ref):
    from vllm.multimodal.media.audio import load_audio

    base = make_audio(2.5, 31).astype(np.float32) / 32768.0
    n = int(len(base) * 44100 / SR)
    x = np.interp(np.arange(n) * SR / 44100, np.arange(len(base)), base).astype(
        np.float32
    )
    data = _wav(x, 44100, "FLAC", "PCM_24")
    y, _ = load_audio(io.BytesIO(data), sr=SR)
    assert (
        _transcribe(llm_server, data, name="a.flac").text
        == ref.greedy(y.astype(np.float64) * 32768.0)[1]
    )


@pytest.mark.parametrize(
    "data", [b"not audio" * 50, b"", _wav(np.zeros(100, np.int16))]
)
def test_api_bad_audio_is_4xx(llm_server, data):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        _transcribe(llm_server, data)
    assert 400 <= e.value.status_code < 500
