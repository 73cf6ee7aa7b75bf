# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""CosyVoice3 LM in vLLM vs the original ``cosyvoice.llm.llm.CosyVoice3LM``.

No PyPI package holds ``CosyVoice3LM``: the oracle is the golden fixture
``fixtures/cosyvoice3_lm/cosyvoice3_lm.pt``, written by its
``make_fixture.py`` from the original code (FunAudioLLM/CosyVoice @ ace7c47)
on the tiny release directory of ``tools/make_cosyvoice3_checkpoint.py``
(seed 0), which this test rebuilds and checks by the sha256 of ``llm.pt``.
vLLM loads the directory as released (``cosyvoice3.yaml``, ``llm.pt``,
``CosyVoice-BlankEN/``).
"""

import hashlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(os.path.realpath(__file__)).parents[3]
sys.path.insert(0, str(REPO / "tools"))

import make_cosyvoice3_checkpoint as mk  # noqa: E402

from vllm.config.text_to_speech import TextToSpeechParams, VoicePrompt  # noqa: E402
from vllm.model_executor.models.cosyvoice2 import ras_distribution  # noqa: E402
from vllm.model_executor.models.cosyvoice3 import (  # noqa: E402
    ENDOFPROMPT_ID,
    CosyVoice3ForCausalLM,
    CosyVoice3Vocab,
)

from .cosyvoice_lm_common import check_seeded_sampling  # noqa: E402

# One in-process engine serves the module: keep vLLM's per-test cleanup off.
pytestmark = pytest.mark.skip_global_cleanup

FIXTURE = REPO / "tests/models/speech/fixtures/cosyvoice3_lm/cosyvoice3_lm.pt"
SYSTEM = "You are a helpful assistant.<|endofprompt|>"
TEXT = "The quick brown fox jumps over the lazy dog."
S = mk.TINY["speech_token_size"]
V_TEXT = mk.TINY["text_vocab"]
ENGINE_KW = dict(
    dtype="float32",
    enforce_eager=True,
    max_model_len=1024,
    max_num_seqs=4,
    max_logprobs=S + 200,
    kv_cache_memory_bytes=64 << 20,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory) -> Path:
    return mk.make_release_dir(
        tmp_path_factory.mktemp("cv3") / "Fun-CosyVoice3-tiny", audio=False
    )


def _engine(model_dir: Path, **kw):
    from vllm import LLM

    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        return LLM(model=str(model_dir), **{**ENGINE_KW, **kw})
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old


@pytest.fixture(scope="module")
def llm(release_dir):
    engine = _engine(release_dir)
    yield engine
    del engine


def _params(mc, text=TEXT, voice=None, speaker=None, **extra):
    return TextToSpeechParams(
        text=text, model_config=mc, voice=voice, speaker=speaker, extra=extra
    )


def _prompt_ids(params) -> list[int]:
    return CosyVoice3ForCausalLM.get_speech_generation_prompt(params)[
        "prompt_token_ids"
    ]


def _voice(case: dict, ref_text: str = "hello world") -> VoicePrompt | None:
    if not case["prompt_speech"]:
        return None
    return VoicePrompt(ref_text=ref_text, codes=np.array(case["prompt_speech"]))


# ----------------------------------------------------------------- config
def test_checkpoint_is_the_fixtures(release_dir, golden):
    """The rebuilt llm.pt is the one the golden values were computed on."""
    assert sha256(release_dir / "llm.pt") == golden["llm_sha256"], (
        "tools/make_cosyvoice3_checkpoint.py no longer writes the checkpoint "
        "of the fixture: rerun fixtures/cosyvoice3_lm/make_fixture.py"
    )
    state = torch.load(release_dir / "llm.pt", weights_only=True)
    assert "llm_embedding.weight" not in state
    assert "llm_decoder.bias" not in state
    assert state["speech_embedding.weight"].shape == (S + 200, 64)
    assert state["llm_decoder.weight"].shape == (S + 200, 64)


def test_config_from_release_dir(release_dir):
    from vllm.transformers_utils.config import get_config

    cfg = get_config(str(release_dir), trust_remote_code=False)
    assert cfg.architectures == ["CosyVoice3ForCausalLM"]
    assert cfg.cosyvoice_text_vocab_size == V_TEXT
    assert cfg.cosyvoice_speech_token_size == S
    assert cfg.vocab_size == V_TEXT + S + 200
    assert cfg.tie_word_embeddings is False
    v = CosyVoice3Vocab(cfg)
    assert v.speech_offset == V_TEXT
    assert (v.sos, v.eos, v.task_id, v.fill) == (
        V_TEXT + S,
        V_TEXT + S + 1,
        V_TEXT + S + 2,
        V_TEXT + S + 3,
    )
    assert v.stop_token_ids == list(range(V_TEXT + S, V_TEXT + S + 200))


def test_yaml_must_build_cosyvoice3lm(release_dir, tmp_path):
    from vllm.transformers_utils.cosyvoice2 import cosyvoice2_config_dict

    bad = tmp_path / "bad"
    bad.mkdir()
    for p in release_dir.iterdir():
        (bad / p.name).symlink_to(p)
    (bad / "cosyvoice3.yaml").unlink()
    text = (release_dir / "cosyvoice3.yaml").read_text()
    (bad / "cosyvoice3.yaml").write_text(
        text.replace("cosyvoice.llm.llm.CosyVoice3LM", "cosyvoice.llm.llm.Qwen2LM")
    )
    with pytest.raises(ValueError, match="CosyVoice3LM"):
        cosyvoice2_config_dict(bad)


# -------------------------------------------------------------- tokenizer
def test_tokenizer_matches_original(release_dir, golden):
    mc = SimpleNamespace(model=str(release_dir))
    tok = golden["tokenizer"]
    for text, ids in zip(tok["strings"], tok["ids"]):
        assert CosyVoice3ForCausalLM._text_ids(mc, text) == ids
    ours = CosyVoice3ForCausalLM._tokenizer(mc)
    assert len(tok["specials"]) == 280
    assert {t: ours.token_id(t) for t in tok["specials"]} == tok["specials"]
    assert tok["specials"]["<|endofprompt|>"] == ENDOFPROMPT_ID


def test_endofprompt_id_is_checked(tmp_path):
    """A CosyVoice-BlankEN tokenizer that does not put <|endofprompt|> at
    151646 (the id the original hard-codes) is refused."""
    from make_demo_checkpoint import make_tokenizer

    blank = tmp_path / "CosyVoice-BlankEN"
    blank.mkdir()
    make_tokenizer(blank, vocab_size=300)
    with pytest.raises(ValueError, match="151646"):
        CosyVoice3ForCausalLM._text_ids(SimpleNamespace(model=str(tmp_path)), "hi")


# ---------------------------------------------------------------- prompts
def test_prompt_layouts(llm, golden):
    mc = llm.llm_engine.model_config
    v = CosyVoice3Vocab(mc.hf_config)

    def tid(t):
        return CosyVoice3ForCausalLM._text_ids(mc, t)

    plain, zs = golden["cases"]["plain"], golden["cases"]["zero_shot"]
    text = plain["text_ids"]
    sys_ids = tid(SYSTEM)
    assert sys_ids[-1] == ENDOFPROMPT_ID

    # no <|endofprompt|> anywhere: the system prompt goes before the text
    assert _prompt_ids(_params(mc)) == [v.sos] + sys_ids + text + [v.task_id]
    assert plain["prompt_text_ids"] == sys_ids
    # zero-shot: system prompt + transcript, then the prompt speech
    want = (
        [v.sos]
        + zs["prompt_text_ids"]
        + text
        + [v.task_id]
        + v.speech_ids(zs["prompt_speech"])
    )
    assert _prompt_ids(_params(mc, voice=_voice(zs))) == want
    # a transcript that already holds <|endofprompt|> is kept as is
    assert _prompt_ids(_params(mc, voice=_voice(zs, SYSTEM + "hello world"))) == want
    # so is a text that holds it (the original's cross-lingual examples)
    assert _prompt_ids(_params(mc, text=SYSTEM + TEXT)) == (
        [v.sos] + tid(SYSTEM + TEXT) + [v.task_id]
    )
    # cross-lingual: no transcript, no prompt speech
    assert _prompt_ids(_params(mc, voice=_voice(zs), mode="cross_lingual")) == (
        [v.sos] + sys_ids + text + [v.task_id]
    )
    # instruct2: "You are a helpful assistant. <instruction><|endofprompt|>"
    instruct = tid("You are a helpful assistant. speak slowly<|endofprompt|>")
    assert instruct == golden["tokenizer"]["ids"][2]
    for text_in in (
        "speak slowly",
        "You are a helpful assistant. speak slowly<|endofprompt|>",
    ):
        assert _prompt_ids(_params(mc, voice=_voice(zs), instruct_text=text_in)) == [
            v.sos
        ] + instruct + text + [v.task_id]
    # spk2info speakers: the zero-shot entry has its own prompt text
    spk = torch.load(Path(mc.model) / "spk2info.pt", weights_only=True)["spk_a"]
    p = _params(mc, speaker="spk_a")
    assert _prompt_ids(p) == (
        [v.sos]
        + spk["prompt_text"][0].tolist()
        + text
        + [v.task_id]
        + v.speech_ids(spk["llm_prompt_speech_token"][0].tolist())
    )
    assert p.voice is not None and p.voice.extra["prompt_feat"].shape == (24, 80)
    assert _prompt_ids(_params(mc, speaker="spk_sft")) == (
        [v.sos] + sys_ids + text + [v.task_id]
    )
    with pytest.raises(ValueError, match="speech tokens"):
        _prompt_ids(_params(mc, voice=VoicePrompt(ref_text="x", codes=np.array([S]))))

    sp = CosyVoice3ForCausalLM.get_speech_sampling_params(
        _params(mc), {"temperature": 1.0, "max_tokens": 10_000}
    )
    assert (sp.min_tokens, sp.max_tokens) == (plain["min_len"], plain["max_len"])
    assert sp.stop_token_ids == v.stop_token_ids

    cfg = CosyVoice3ForCausalLM.get_speech_config(mc)
    assert cfg.sample_rate == 24000 and cfg.supports_voice_cloning
    assert cfg.default_sampling == {"temperature": 1.0, "top_p": 0.8, "top_k": 25}


# ----------------------------------------------------------------- parity
@pytest.mark.parametrize("mode", ["plain", "zero_shot"])
def test_greedy_tokens_and_logprobs_match_original(llm, golden, mode):
    from vllm.inputs import TokensPrompt

    mc = llm.llm_engine.model_config
    v = CosyVoice3Vocab(mc.hf_config)
    case = golden["cases"][mode]
    params = _params(mc, voice=_voice(case))
    prompt = CosyVoice3ForCausalLM.get_speech_generation_prompt(params)
    sp = CosyVoice3ForCausalLM.get_speech_sampling_params(
        params, {"temperature": 0.0, "max_tokens": 4096}
    )
    sp.logprobs = v.num_speech_rows
    assert sp.max_tokens == case["max_len"] and sp.min_tokens == case["min_len"]

    out = llm.generate(TokensPrompt(**prompt), sp, use_tqdm=False)[0].outputs[0]
    want = case["tokens"]
    assert len(want) >= 32
    assert [t - v.speech_offset for t in out.token_ids] == want
    # the original ran to max_len (no stop id was the argmax)
    assert len(want) == case["max_len"] and out.finish_reason == "length"
    frames = CosyVoice3ForCausalLM.get_speech_frames(out, mc)
    assert frames.shape == (len(case["frames"]), 1)
    assert frames[:, 0].tolist() == case["frames"]
    errs = []
    for i, ref in enumerate(case["logprobs"]):
        lp = out.logprobs[i]
        ours = torch.tensor(
            [lp[v.speech_offset + j].logprob for j in range(v.num_speech_rows)]
        )
        errs.append(rel_err(ours, ref))
    print(f"{mode}: {len(want)} tokens, max log-prob rel. error {max(errs):.2e}")
    assert max(errs) < 1e-3


def test_batch_equals_single(llm, golden):
    from vllm.inputs import TokensPrompt

    mc = llm.llm_engine.model_config
    prompts, params = [], []
    for t in (TEXT, "hello world", "Pack my box with five dozen liquor jugs."):
        p = _params(mc, text=t)
        prompts.append(
            TokensPrompt(**CosyVoice3ForCausalLM.get_speech_generation_prompt(p))
        )
        params.append(
            CosyVoice3ForCausalLM.get_speech_sampling_params(
                p, {"temperature": 0.0, "max_tokens": 4096}
            )
        )
    batch = [
        o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)
    ]
    single = [
        llm.generate(p, s, use_tqdm=False)[0].outputs[0].token_ids
        for p, s in zip(prompts, params)
    ]
    assert batch == single
    v = CosyVoice3Vocab(mc.hf_config)
    assert [t - v.speech_offset for t in batch[0]] == golden["cases"]["plain"]["tokens"]


# ------------------------------------------------------------- stop rules
def test_stop_rules_match_original(release_dir, golden, tmp_path, llm):
    """sos (row S) is held back below min_len and ends the utterance at
    min_len; eos (row S + 1) is not held back: the original stops early. vLLM
    does not stop below min_tokens, so the request repeats eos up to
    min_tokens and the frames stop at the first stop id."""
    from vllm.inputs import TokensPrompt

    variant = golden["variants"]["stops"]
    vdir = tmp_path / "stops"
    vdir.mkdir()
    for p in release_dir.iterdir():
        if p.name != "llm.pt":
            (vdir / p.name).symlink_to(p)
    state = torch.load(release_dir / "llm.pt", weights_only=True)
    mk.write_llm(vdir, mk.set_decoder_rows(state, variant["rows"]))
    assert sha256(vdir / "llm.pt") == variant["llm_sha256"]

    engine = _engine(vdir, max_logprobs=20)
    mc = engine.llm_engine.model_config
    v = CosyVoice3Vocab(mc.hf_config)
    for mode, want in variant["tokens"].items():
        case = golden["cases"][mode]
        params = _params(mc, voice=_voice(case))
        prompt = CosyVoice3ForCausalLM.get_speech_generation_prompt(params)
        sp = CosyVoice3ForCausalLM.get_speech_sampling_params(
            params, {"temperature": 0.0, "max_tokens": 4096}
        )
        out = engine.generate(TokensPrompt(**prompt), sp, use_tqdm=False)[0].outputs[0]
        frames = CosyVoice3ForCausalLM.get_speech_frames(out, mc)[:, 0].tolist()
        assert frames == want
        assert out.finish_reason == "stop"
        ids = list(out.token_ids)
        if mode == "plain":  # eos at k < min_len, repeated up to min_len
            assert len(want) < case["min_len"]
            assert ids == [v.speech_offset + t for t in want] + [v.eos] * (
                case["min_len"] - len(want)
            )
        else:  # sos held back until min_len, then it stops
            assert len(want) == case["min_len"]
            assert ids == [v.speech_offset + t for t in want] + [v.sos]
    del engine


def test_silent_token_filter_matches_original(llm, golden):
    """``get_speech_frames`` keeps the first 5 tokens of a silent run, as the
    original ``llm_job`` does, and its result grows with the output (so
    streaming sees a stable prefix)."""
    from vllm.outputs import CompletionOutput

    silent = golden["silent"]
    assert tuple(silent["silent_tokens"]) == CosyVoice3Vocab.silent_tokens
    mc = llm.llm_engine.model_config
    v = CosyVoice3Vocab(mc.hf_config)
    stream = v.speech_ids(silent["stream"])

    def frames(ids):
        out = CompletionOutput(
            index=0, text="", token_ids=ids, cumulative_logprob=None, logprobs=None
        )
        return CosyVoice3ForCausalLM.get_speech_frames(out, mc)[:, 0].tolist()

    assert frames(stream) == silent["kept"]
    assert frames(stream + [v.eos] + v.speech_ids([4, 5])) == silent["kept"]
    for n in range(len(stream)):
        assert frames(stream[:n]) == silent["kept"][: len(frames(stream[:n]))]


# -------------------------------------------------------------------- RAS
def test_ras_law_matches_original_draws(golden):
    """The RAS law with the repeated token excluded from the fallback (and
    row S at -inf below min_len) equals the frequencies of 20000 draws of
    the original ``sampling_ids`` + ``ras_sampling``; the CosyVoice2-era law
    (fallback over the full softmax) does not."""
    for case in golden["ras"]:
        scores = case["scores"].clone()
        if case["ignore_eos"]:
            scores[S] = float("-inf")
        dec = case["decoded"][-10:]
        hist = torch.tensor([dec + [-1] * (10 - len(dec))])
        args = (scores[None], hist, torch.tensor([0.8]), torch.tensor([25]), 10, 0.1)
        law = ras_distribution(*args, exclude_repeated=True)[0]
        law = law / law.sum()
        emp = case["counts"] / case["counts"].sum()
        assert (law - emp).abs().max() < 0.012
        old = ras_distribution(*args)[0]
        assert (old / old.sum() - emp).abs().max() > 0.03
        if case["ignore_eos"]:
            assert law[S] == 0 and emp[S] == 0


def test_seeded_sampling_in_engine(llm):
    """Seeded RAS through the runner's model-sampler hook: reproducible per
    seed, speech ids only, lengths within min/max."""
    mc = llm.llm_engine.model_config
    check_seeded_sampling(
        llm, CosyVoice3ForCausalLM, CosyVoice3Vocab(mc.hf_config), _params(mc)
    )


# ------------------------------------------------------------ bad inputs
def test_llm_pt_without_speech_embedding(release_dir, tmp_path, llm):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in release_dir.iterdir():
        if p.name != "llm.pt":
            (bad / p.name).symlink_to(p)
    state = torch.load(release_dir / "llm.pt", weights_only=True)
    del state["speech_embedding.weight"]
    torch.save(state, bad / "llm.pt")
    with pytest.raises(Exception) as e:
        _engine(bad, max_model_len=128, kv_cache_memory_bytes=16 << 20)
    msg = str(e.value) + repr(e.value.__cause__)
    assert "speech_embedding" in msg
