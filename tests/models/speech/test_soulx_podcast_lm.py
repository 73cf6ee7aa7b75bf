# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""SoulX-Podcast in vLLM vs the original's rules.

A tiny random release directory is written in the original format
(``tools/make_soulx_podcast_checkpoint.py``: a Qwen3 ``config.json`` +
``model.safetensors`` + HF tokenizer with the SoulX added tokens,
``soulxpodcast_config.json``, ``flow.pt``, ``hift.pt``). The LM is checked
against HF transformers' ``Qwen3ForCausalLM`` (what the original's HF engine
runs) with the original's processors; prompts against the layout of
``soulxpodcast/utils/dataloader.py`` and the turn loop of
``SoulXPodcast.forward_longform`` (written out below); the sampler against
an independent reference of ``_ras_sample_hf_engine`` built from HF's own
logits processors.
"""

import os
import shutil
import sys
from itertools import chain
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(os.path.realpath(__file__)).parents[3]
sys.path.insert(0, str(REPO / "tools"))

from make_soulx_podcast_checkpoint import make_release_dir  # noqa: E402

from vllm.config.text_to_speech import TextToSpeechParams  # noqa: E402
from vllm.model_executor.models.soulx_podcast import (  # noqa: E402
    SoulXPodcastForCausalLM,
    dialogue_context,
    normalize_text,
    parse_dialogue,
    soulx_law,
    soulx_scores,
)

# One in-process engine serves the module: keep vLLM's per-test cleanup off.
pytestmark = pytest.mark.skip_global_cleanup

M = SoulXPodcastForCausalLM
VOCAB = 740
OFFSET = 640


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory) -> Path:
    return make_release_dir(tmp_path_factory.mktemp("soulx") / "SoulX-Podcast-tiny")


@pytest.fixture(scope="module")
def tok(release_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(release_dir, use_fast=True)


@pytest.fixture(scope="module")
def eos(tok):
    return tok.convert_tokens_to_ids("<|semantic_token_end|>")


@pytest.fixture(scope="module")
def hf(release_dir):
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(release_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(release_dir):
    from vllm import LLM

    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        yield LLM(
            model=str(release_dir),
            dtype="float32",
            enforce_eager=True,
            max_model_len=2048,
            max_num_seqs=4,
            max_logprobs=VOCAB,
            kv_cache_memory_bytes=64 << 20,
        )
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old


def _params(llm, text, voices=("spk_a", "spk_b"), **kw):
    return TextToSpeechParams(
        text=text,
        model_config=llm.llm_engine.model_config,
        voices=list(voices),
        **kw,
    )


def _presets(release_dir):
    return torch.load(release_dir / "spk2info.pt", weights_only=True)


# ----------------------------------------------------------- detection ----
def test_release_dir_detection(release_dir, tmp_path):
    """flow.pt + hift.pt beside a Qwen3 config.json make the directory a
    SoulX-Podcast release; without them it stays a plain Qwen3."""
    from vllm.model_executor.models.registry import _TEXT_GENERATION_MODELS
    from vllm.transformers_utils.config import get_config
    from vllm.transformers_utils.soulx_podcast import is_soulx_podcast_release_dir

    cfg = get_config(str(release_dir), trust_remote_code=False)
    assert cfg.architectures == ["SoulXPodcastForCausalLM"]
    assert cfg.soulx_speech_token_offset == OFFSET
    assert cfg.soulx_speech_token_size == VOCAB - OFFSET
    assert cfg.soulx_sampling == {
        "temperature": 0.6,
        "repetition_penalty": 1.25,
        "top_k": 100,
        "top_p": 0.9,
        "min_tokens": 8,
        "max_tokens": 3000,
        "win_size": 25,
        "tau_r": 0.2,
    }
    assert cfg.soulx_context["max_turn_size"] == 10
    assert cfg.soulx_context["turn_tokens_threshold"] == 6192
    assert _TEXT_GENERATION_MODELS["SoulXPodcastForCausalLM"] == (
        "soulx_podcast",
        "SoulXPodcastForCausalLM",
    )
    plain = tmp_path / "qwen3"
    shutil.copytree(release_dir, plain)
    (plain / "flow.pt").unlink()
    (plain / "hift.pt").unlink()
    assert not is_soulx_podcast_release_dir(plain)
    assert get_config(str(plain), False).architectures == ["Qwen3ForCausalLM"]
    assert not hasattr(get_config(str(plain), False), "soulx_speech_eos_id")


def test_engine_loads_release(llm, eos):
    mc = llm.llm_engine.model_config
    assert mc.architecture == "SoulXPodcastForCausalLM"
    assert "speech" in llm.llm_engine.get_supported_tasks()
    assert mc.hf_config.soulx_speech_eos_id == eos
    # no auxiliary codes: prefix caching stays on across the turns
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching


# ---------------------------------------------------------------- text ----
@pytest.mark.parametrize(
    "text,want",
    [
        ("你好 世界", "你好世界。"),
        ("Hello world", "Hello world."),
        ("Hello 世界", "Hello世界。"),
        ("世界 hello", "世界hello."),
        ("ok!", "ok!"),
        ("测试，", "测试，"),
        ("a <|laughter|> 123", "a <|laughter|> 123"),
        ("你好吗?", "你好吗?"),
    ],
)
def test_normalize_text(text, want):
    assert normalize_text(text) == want


def test_parse_dialogue():
    # as the web UI: findall, strip, text after the tag kept as is
    assert parse_dialogue("[S1] 哈喽\n[S2] 你好呀 [S1]bye") == [
        (0, " 哈喽"),
        (1, " 你好呀"),
        (0, "bye"),
    ]
    assert parse_dialogue("just text") == [(0, "just text")]
    assert parse_dialogue("[S4]x") == [(3, "x")]
    for bad, msg in [
        ("[S5]hi", "unknown speaker tag"),
        ("[S0]hi", "unknown speaker tag"),
        ("[S1]  [S2]x", "empty turn"),
        ("hello [S1]x", "before the first speaker tag"),
        ("[S1]a [laugh] b", "brackets"),
        ("a [laugh] b", "brackets"),
        ("[S1]\nhello", "several lines"),
        ("[S1]hello\nworld[S2]x", "several lines"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_dialogue(bad)


# ------------------------------------------------------------- prompts ----
# the presets' transcripts after normalize_text
NORMALISED = {
    "spk_a": "Hello everyone, welcome to our podcast.",
    "spk_b": "哈喽，欢迎收听我们的节目。",
}


def _original_prompt(tok, release_dir, eos, name, index):
    """dataloader.py's prompt of speaker ``index``: the normalised transcript
    between the speaker / text / semantic markers (task token first for
    speaker 0), then its speech tokens + offset and the speech eos."""
    info = _presets(release_dir)[name]
    assert normalize_text(info["prompt_text"]) == NORMALISED[name]
    text = NORMALISED[name]
    s = f"<|SPEAKER_{index}|><|text_start|>{text}<|text_end|><|semantic_token_start|>"
    if index == 0:
        s = "<|task_podcast|>" + s
    speech = [int(t) + OFFSET for t in info["llm_prompt_speech_token"].reshape(-1)]
    return tok.encode(s) + speech + [eos]


def _original_loop(prompt_inputs, text_tokens, outputs, cfg):
    """``SoulXPodcast.forward_longform``'s LLM loop with ``generate``
    answered from ``outputs``; returns the inputs of every generate call."""
    prompt_inputs = [list(p) for p in prompt_inputs]
    history_inputs = [list(p) for p in prompt_inputs]
    inputs = list(chain.from_iterable(prompt_inputs))
    valid_turn_size = len(prompt_inputs)
    calls = []
    for i in range(len(text_tokens)):
        if (
            valid_turn_size > cfg["max_turn_size"]
            or len(inputs) > cfg["turn_tokens_threshold"]
        ):
            prompt_text_bound = max(
                cfg["prompt_context"],
                len(history_inputs)
                - cfg["history_text_context"]
                - cfg["history_context"],
            )
            inputs = list(
                chain.from_iterable(
                    history_inputs[: cfg["prompt_context"]]
                    + history_inputs[prompt_text_bound : -cfg["history_context"]]
                    + prompt_inputs[-cfg["history_context"] :]
                )
            )
            valid_turn_size = (
                cfg["prompt_context"] + len(history_inputs) - prompt_text_bound
            )
        valid_turn_size += 1
        inputs.extend(text_tokens[i])
        calls.append(list(inputs))
        inputs.extend(outputs[i])
        prompt_inputs.append(text_tokens[i] + outputs[i])
        history_inputs.append(text_tokens[i][:-1])
    return calls


def test_prompt_layout_matches_original(llm, tok, release_dir, eos):
    mc = llm.llm_engine.model_config
    p0 = _original_prompt(tok, release_dir, eos, "spk_a", 0)
    p1 = _original_prompt(tok, release_dir, eos, "spk_b", 1)
    # the prompt of the first turn, written out
    params = _params(llm, "[S1] Hello there [S2]你好 世界")
    segs = M.split_speech_text(params)
    assert segs == ["[S1] Hello there", "[S2]你好 世界"]
    params.text = segs[0]
    got = M.get_speech_generation_prompt(params)["prompt_token_ids"]
    turn0 = tok.encode(
        "<|SPEAKER_0|><|text_start|> Hello there.<|text_end|><|semantic_token_start|>"
    )
    assert got == p0 + p1 + turn0
    assert params.voice.name == "spk_a"  # the decoder conditions on S1
    assert tok.convert_tokens_to_ids("<|task_podcast|>") == got[0]
    # later turns: previous turns and their generated tokens in context,
    # context resets past 10 turns, as the original's loop
    rng = np.random.default_rng(0)
    script = "".join(f"[S{1 + i % 2}]turn number {i} 你好" for i in range(14))
    params = _params(llm, script)
    segs = M.split_speech_text(params)
    text_tokens = [
        tok.encode(
            f"<|SPEAKER_{i % 2}|><|text_start|>turn number {i} 你好。"
            "<|text_end|><|semantic_token_start|>"
        )
        for i in range(14)
    ]
    outputs = [
        [int(t) for t in rng.integers(OFFSET, VOCAB, 5 + i)] + [eos] for i in range(14)
    ]
    want = _original_loop([p0, p1], text_tokens, outputs, mc.hf_config.soulx_context)
    for i, seg in enumerate(segs):
        p = _params(llm, seg)
        p.context = list(zip(segs[:i], outputs[:i]))
        assert M.get_speech_generation_prompt(p)["prompt_token_ids"] == want[i], i
        assert p.voice.name == ("spk_a", "spk_b")[i % 2]
    # the reset happened (before turn 10: 2 prompts + 9 turns > 10)
    assert len(want[9]) < len(want[8]) and len(want[8]) > len(want[7])
    # the length rule (6192 tokens), with a small threshold
    cfg = dict(mc.hf_config.soulx_context, turn_tokens_threshold=60)
    want = _original_loop([p0, p1], text_tokens[:6], outputs[:6], cfg)
    for i in range(6):
        got = dialogue_context(
            [p0, p1], list(zip(text_tokens[:i], outputs[:i])), text_tokens[i], **cfg
        )
        assert got == want[i]


# ----------------------------------------------------- dialect prompts ----
# extra_args.dialect_prompt_text, one per voice, and after normalize_text
DIALECT = ["<|Sichuan|>要得要得 巴适得很", "<|Yue|>真係冇讲错啊"]
DIALECT_NORMALISED = ["<|Sichuan|>要得要得巴适得很。", "<|Yue|>真係冇讲错啊。"]


def _original_dialect(tok, release_dir, eos, texts, generated=None):
    """``forward_longform`` with ``use_dialect_prompt`` (dataloader.py's
    ``dialect_prompt_text_tokens`` and ``dialect_prefix``), written out:
    speaker i's prompt is re-generated from
    ``dialect_prefix[0] (task, i > 0 only) + prompt_text_tokens[i] (task
    first for i == 0) + speech tokens + eos + dialect_prompt_text_tokens[i]``
    (the dialect text, normalised, between the speaker / text / semantic
    markers); what is kept is ``dialect_prefix[i + 1] (task for i == 0, []
    otherwise) + dialect_prompt_text_tokens[i] + generated``. Returns the
    re-generation inputs and (with ``generated``) the kept prompts."""
    task = tok.encode("<|task_podcast|>")
    inputs, kept = [], []
    for i, (name, text) in enumerate(zip(("spk_a", "spk_b"), texts)):
        prompt = _original_prompt(tok, release_dir, eos, name, i)
        d = tok.encode(
            f"<|SPEAKER_{i}|><|text_start|>{text}<|text_end|><|semantic_token_start|>"
        )
        inputs.append((task if i > 0 else []) + prompt + d)
        if generated is not None:
            kept.append((task if i == 0 else []) + d + list(generated[i]))
    return inputs, kept


def _dialect_params(llm, text, texts=DIALECT, **kw):
    return _params(llm, text, extra={"dialect_prompt_text": list(texts)}, **kw)


def test_dialect_prompt_layout_matches_original(llm, tok, release_dir, eos):
    """The re-generation requests (one per speaker, the turns' sampling) and
    every turn's prompt with the re-generated prompts in place of the
    zero-shot ones, context resets included, vs the original's rules."""
    mc = llm.llm_engine.model_config
    assert [normalize_text(t) for t in DIALECT] == DIALECT_NORMALISED
    params = _dialect_params(llm, "[S1]Hello there[S2]你好")
    kwargs = {"temperature": 0.6, "top_p": 0.9, "top_k": 100, "seed": 3}
    prelude = M.get_speech_prelude(params, dict(kwargs, max_tokens=50))
    want_inputs, _ = _original_dialect(tok, release_dir, eos, DIALECT_NORMALISED)
    assert [pr["prompt_token_ids"] for pr, _ in prelude] == want_inputs
    assert want_inputs[1][0] == tok.convert_tokens_to_ids("<|task_podcast|>")
    turn_sp = M.get_speech_sampling_params(params, dict(kwargs, max_tokens=50))
    for _, sp in prelude:  # sampled as the turns are (one SamplingParams)
        for key in (
            "temperature",
            "top_p",
            "top_k",
            "repetition_penalty",
            "seed",
            "min_tokens",
            "max_tokens",
            "stop_token_ids",
        ):
            assert getattr(sp, key) == getattr(turn_sp, key), key
        assert sp.repetition_penalty == 1.25 and sp.min_tokens == 8
    # the turns: the kept prompts replace the zero-shot ones in every turn
    # and in the context reset (14 turns)
    rng = np.random.default_rng(2)
    generated = [
        [int(t) for t in rng.integers(OFFSET, VOCAB, 9 + i)] + [eos] for i in range(2)
    ]
    _, kept = _original_dialect(tok, release_dir, eos, DIALECT_NORMALISED, generated)
    script = "".join(f"[S{1 + i % 2}]turn number {i} 你好" for i in range(14))
    segs = M.split_speech_text(_dialect_params(llm, script))
    text_tokens = [M._turn_ids(mc, seg)[1] for seg in segs]
    outputs = [
        [int(t) for t in rng.integers(OFFSET, VOCAB, 5 + i)] + [eos] for i in range(14)
    ]
    want = _original_loop(kept, text_tokens, outputs, mc.hf_config.soulx_context)
    zero_shot = [
        _original_prompt(tok, release_dir, eos, n, i)
        for i, n in enumerate(("spk_a", "spk_b"))
    ]
    for i, seg in enumerate(segs):
        p = _dialect_params(llm, seg)
        p.prelude = generated
        p.context = list(zip(segs[:i], outputs[:i]))
        got = M.get_speech_generation_prompt(p)["prompt_token_ids"]
        assert got == want[i], i
        assert got[: len(kept[0]) + len(kept[1])] == kept[0] + kept[1]
        assert p.voice.name == ("spk_a", "spk_b")[i % 2]  # flow: zero-shot voice
    assert len(want[9]) < len(want[8])  # the reset happened, prompts kept
    p = _params(llm, segs[0])
    assert (
        M.get_speech_generation_prompt(p)["prompt_token_ids"][
            : len(zero_shot[0]) + len(zero_shot[1])
        ]
        == zero_shot[0] + zero_shot[1]
    )
    # one speaker without a dialect text: the original re-generates its
    # prompt too, from an empty text
    texts = [DIALECT[0], ""]
    prelude = M.get_speech_prelude(_dialect_params(llm, segs[0], texts), kwargs)
    want_inputs, _ = _original_dialect(
        tok, release_dir, eos, [DIALECT_NORMALISED[0], ""]
    )
    assert [pr["prompt_token_ids"] for pr, _ in prelude] == want_inputs
    assert want_inputs[1][-4:] == tok.encode(
        "<|SPEAKER_1|><|text_start|><|text_end|><|semantic_token_start|>"
    )
    # not asked for, or every text empty: no re-generation
    assert M.get_speech_prelude(_params(llm, segs[0]), kwargs) == []
    assert M.get_speech_prelude(_dialect_params(llm, segs[0], ["", ""]), kwargs) == []
    p = _dialect_params(llm, segs[0], ["", ""])
    assert M.get_speech_generation_prompt(p) == M.get_speech_generation_prompt(
        _params(llm, segs[0])
    )
    # one speaker: a string is its dialect text
    p = _params(
        llm, "[S1]hi", voices=("spk_b",), extra={"dialect_prompt_text": DIALECT[1]}
    )
    ((pr, _),) = M.get_speech_prelude(p, kwargs)
    assert pr["prompt_token_ids"] == _original_prompt(
        tok, release_dir, eos, "spk_b", 0
    ) + tok.encode(
        f"<|SPEAKER_0|><|text_start|>{DIALECT_NORMALISED[1]}<|text_end|>"
        "<|semantic_token_start|>"
    )
    # the turns need the re-generated prompts
    with pytest.raises(ValueError, match="re-generated speaker prompts are missing"):
        M.get_speech_generation_prompt(_dialect_params(llm, segs[0]))


@pytest.mark.parametrize(
    "value,message",
    [
        (["<|Sichuan|>好"], r"1 text\(s\) for 2 speaker"),
        (["<|Sichuan|>好", "", ""], r"3 text\(s\) for 2 speaker"),
        ("<|Sichuan|>好", "must be a list"),
        ([1, "<|Yue|>好"], "must be a list"),
        ({"S1": "<|Yue|>好"}, "must be a list"),
        (["Sichuan 好", ""], r"dialect_prompt_text\[0\] \(speaker S1\) must start"),
        (["", " <|Yue|>好"], r"speaker S2\) must start with a dialect tag"),
        (["", "<|Shanghai|>好"], "must start with a dialect tag"),
        (["<|Henan|>  ", ""], "has no text"),
    ],
)
def test_dialect_prompt_validation(llm, value, message):
    params = _params(llm, "[S1]a[S2]b", extra={"dialect_prompt_text": value})
    with pytest.raises(ValueError, match=message):
        M.get_speech_prelude(params, {})


def test_dialect_prompt_needs_dialect_tokens(llm, monkeypatch):
    """A tokenizer without the dialect tags (not the -dialect release)."""

    class NoDialect:
        def token_id(self, token):
            raise ValueError(f"the tokenizer has no {token}")

    monkeypatch.setattr(M, "_tokenizer", classmethod(lambda cls, mc: NoDialect()))
    params = _dialect_params(llm, "[S1]a[S2]b")
    with pytest.raises(ValueError, match=r"has no <\|Sichuan\|> token"):
        M.get_speech_prelude(params, {})


def test_voice_validation(llm):
    with pytest.raises(ValueError, match="only 2 voice"):
        M.split_speech_text(_params(llm, "[S1]a[S3]b"))
    with pytest.raises(ValueError, match="needs a voice"):
        M.split_speech_text(_params(llm, "[S1]a", voices=()))
    with pytest.raises(ValueError, match="unknown preset"):
        M.split_speech_text(_params(llm, "[S1]a", voices=("nobody",)))
    with pytest.raises(ValueError, match="at most 4"):
        M.split_speech_text(_params(llm, "[S1]a", voices=("spk_a",) * 5))


# ------------------------------------------------------------- the LM ----
def _prompt(llm):
    params = _params(llm, "[S1]Hello everyone, today we talk about speech.")
    return M.get_speech_generation_prompt(params)["prompt_token_ids"], params


def test_logits_and_greedy_match_hf(llm, hf):
    """fp32 log-probs of every step (full vocabulary) within 1e-3 of HF
    transformers' Qwen3ForCausalLM, and the same 32 greedy tokens."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids, _ = _prompt(llm)
    sp = SamplingParams(temperature=0.0, max_tokens=32, logprobs=VOCAB, ignore_eos=True)
    out = llm.generate(TokensPrompt(prompt_token_ids=ids), sp, use_tqdm=False)[0]
    got = list(out.outputs[0].token_ids)
    assert len(got) == 32
    want: list[int] = []
    with torch.no_grad():
        for _ in range(32):  # plain greedy over the full vocabulary
            step = hf(torch.tensor([ids + want])).logits[0, -1]
            want.append(int(step.argmax()))
        logits = hf(torch.tensor([ids + got])).logits[0, len(ids) - 1 : -1]
    assert got == want
    ref = logits.log_softmax(-1)
    for step, lp in enumerate(out.outputs[0].logprobs):
        vec = torch.full((VOCAB,), float("-inf"))
        for t, v in lp.items():
            vec[t] = v.logprob
        assert torch.isfinite(vec).all()
        assert rel_err(vec, ref[step]) < 1e-3, step


@pytest.mark.parametrize("penalty", [1.25, 3.0])
def test_greedy_with_original_processors_matches_hf(llm, hf, eos, penalty):
    """The model's sampler at temperature 0 with the original's
    min_new_tokens (speech eos) and repetition penalty on the generated ids
    only: the tokens HF generate gives with the same processors (the
    original's 1.25, and a per-request 3.0 that reshapes the sequence)."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    from vllm.inputs import TokensPrompt

    ids, params = _prompt(llm)
    kwargs = {"temperature": 0.0, "max_tokens": 40}
    if penalty != 1.25:
        kwargs["repetition_penalty"] = penalty
    sp = M.get_speech_sampling_params(params, kwargs)
    assert sp.repetition_penalty == penalty and sp.min_tokens == 8
    assert sp.stop_token_ids == [eos] and sp.ignore_eos
    out = llm.generate(TokensPrompt(prompt_token_ids=ids), sp, use_tqdm=False)[0]
    got = list(out.outputs[0].token_ids)

    def hf_greedy(**kw):
        with torch.no_grad():
            return hf.generate(
                torch.tensor([ids]),
                do_sample=False,
                max_new_tokens=40,
                min_new_tokens=8,
                eos_token_id=eos,
                pad_token_id=0,
                **kw,
            )[0, len(ids) :].tolist()

    want = hf_greedy(
        logits_processor=LogitsProcessorList(
            [RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=len(ids))]
        )
    )
    assert got == want
    if penalty == 3.0:
        assert len(set(want)) > 3
        # not what a penalty over the prompt too (vLLM's built-in) gives
        assert hf_greedy(repetition_penalty=penalty) != want


# ------------------------------------------------------------ sampling ----
def _reference_law(
    raw,
    input_ids,
    prompt_len,
    eos,
    *,
    min_new=8,
    penalty=1.25,
    temperature=0.6,
    top_k=100,
    top_p=0.9,
    win=25,
    tau=0.2,
):
    """``_ras_sample_hf_engine`` per row, from HF's processors in the
    original's order: the candidate ``c ~ softmax(scores)`` resamples from
    the raw logits if ``count(c in input_ids[-win:]) + 1 >= win * tau``,
    else the token is drawn from ``softmax(scores)`` again."""
    from transformers import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList(
        [
            MinNewTokensLengthLogitsProcessor(prompt_len, min_new, eos),
            RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=prompt_len),
            TemperatureLogitsWarper(temperature),
            TopKLogitsWarper(top_k),
            TopPLogitsWarper(top_p),
        ]
    )
    ids = torch.tensor([input_ids])
    scores = procs(ids, raw[None].clone())[0]
    n = scores.softmax(-1)
    f = raw.softmax(-1)
    window = ids[0, -win:]
    law = torch.zeros_like(n)
    for c in torch.nonzero(n > 0).reshape(-1).tolist():
        rep = int((window == c).sum()) + 1 >= win * tau
        law += n[c] * (f if rep else n)
    return law


def _our_law(raw, prompt, output, eos, min_tokens=8, penalty=1.25):
    rows = raw[None]
    scores = soulx_scores(
        rows.clone(),
        eos,
        [0] if len(output) < min_tokens else [],
        [list(output)],
        torch.tensor([penalty]),
    )
    hist = torch.tensor([(list(prompt) + list(output))[-25:]])
    return soulx_law(
        scores,
        rows,
        hist,
        torch.tensor([0.6]),
        torch.tensor([0.9]),
        torch.tensor([100]),
        25,
        0.2,
    )[0]


@pytest.mark.parametrize("case", ["prompt_repeat", "output_repeat", "min_tokens"])
def test_sampling_law_matches_reference(case, eos):
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(VOCAB, generator=g) * 2.0
    top = int(raw.argmax())
    prompt = torch.randint(0, VOCAB, (40,), generator=g).tolist()
    output: list[int] = torch.randint(OFFSET, VOCAB, (12,), generator=g).tolist()
    if case == "prompt_repeat":
        # the likeliest token 4x in the prompt's tail: the window (prompt
        # included) makes it repeat -> raw-logit fallback
        output = output[:2]
        prompt[-8:-4] = [top] * 4
    elif case == "output_repeat":
        output[-6:-2] = [top] * 4
        prompt[-3:] = [output[0]] * 3  # penalised as output, not as prompt
    else:
        output = output[:3]
        raw[eos] = raw.max() + 3.0  # eos likeliest: held back below 8
        # the likeliest other token repeats (from the prompt): the raw-logit
        # fallback can give eos even below min_tokens
        prompt[-8:-4] = [top] * 4
    want = _reference_law(raw, prompt + output, len(prompt), eos)
    got = _our_law(raw, prompt, output, eos)
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
    if case != "min_tokens":
        assert want[top] > 0.0 and (raw.softmax(-1) - want).abs().max() > 1e-3
    else:
        assert got[eos] > 0.0  # only through the raw-logit fallback...
        assert got[eos] < raw.softmax(-1)[eos]
    # a penalty over prompt ids too differs
    wrong = _reference_law(raw, prompt + output, 0, eos, min_new=0)
    if case != "min_tokens":
        assert (wrong - want).abs().max() > 1e-4


def test_model_sampler_hook(llm):
    """``sample_codebooks`` as the runner calls it: a candidate seen 4 times
    in the window (prompt tokens count) falls back to the raw softmax, 3
    times does not; min_tokens holds back only the speech eos; the
    penalty uses the request's generated ids."""

    def run(model):
        from vllm.v1.sample.logits_processor import LogitsProcessors
        from vllm.v1.sample.metadata import SamplingMetadata

        rows, t, u = 3000, OFFSET + 7, OFFSET + 9
        logits = torch.full((rows, VOCAB), -2.0)
        logits[:, t] = 4.6
        logits[:, u] = 4.0  # top-1 once t's logit is penalised (4.6 / 1.25)
        hist = torch.full((rows, 25, 1), -1, dtype=torch.long)
        hist[:1000, :3, 0] = t  # 3x: no fallback
        hist[1000:2000, :4, 0] = t  # 4x: fallback
        full = lambda x: torch.full((rows,), x)  # noqa: E731
        md = SamplingMetadata(
            temperature=full(0.6),
            all_greedy=False,
            all_random=True,
            top_p=full(0.9),
            top_k=torch.full((rows,), 1),
            generators={},
            max_num_logprobs=None,
            no_penalties=False,
            prompt_token_ids=None,
            frequency_penalties=full(0.0),
            presence_penalties=full(0.0),
            repetition_penalties=full(1.25),
            # rows >= 2000 generated t before: penalised, u becomes top-1
            output_token_ids=[[] for _ in range(2000)]
            + [[t] for _ in range(rows - 2000)],
            allowed_token_ids_mask=None,
            bad_words_token_ids={},
            logitsprocs=LogitsProcessors(),
        )
        torch.manual_seed(0)
        ids, aux = model.sample_codebooks(logits, torch.zeros(rows, 8), md, hist)
        return ids.cpu(), aux.shape

    ids, aux_shape = llm.apply_model(run)[0]
    t, u = OFFSET + 7, OFFSET + 9
    raw = torch.full((VOCAB,), -2.0)
    raw[t], raw[u] = 4.6, 4.0
    assert aux_shape == (3000, 0)
    assert (ids[:1000] == t).all()  # 3 + 1 < 5: the nucleus draw stays
    share = (ids[1000:2000] == t).float().mean().item()
    assert abs(share - raw.softmax(-1)[t].item()) < 0.05  # raw softmax
    assert (ids[2000:] == u).all()


def test_history_includes_prompt():
    """The runner hands models with ``codebook_history_includes_prompt`` the
    last W ids of prompt + output (the original's ``input_ids[-25:]``)."""
    from vllm.v1.worker.multi_codebook import MultiCodebookRunnerState

    def req(prompt, out):
        return SimpleNamespace(
            req_id=str(len(prompt)),
            prompt_token_ids=prompt,
            output_token_ids=out,
            num_prompt_tokens=len(prompt),
            sampling_params=SimpleNamespace(max_tokens=16, extra_args=None),
        )

    reqs = {"a": req(list(range(10)), [50, 51]), "b": req([1, 2], [7])}

    def runner(with_prompt):
        model = SimpleNamespace(
            supports_multi_codebook=True,
            num_aux_codebooks=0,
            codebook_history_window=5,
            codebook_history_includes_prompt=with_prompt,
        )
        return SimpleNamespace(
            get_model=lambda: model,
            input_batch=SimpleNamespace(req_ids=["a", "b"], num_reqs=2),
            requests=reqs,
            max_model_len=64,
            device="cpu",
        )

    hist = MultiCodebookRunnerState(runner(True))._history()[..., 0].tolist()
    assert hist == [[7, 8, 9, 50, 51], [1, 2, 7, -1, -1]]
    hist = MultiCodebookRunnerState(runner(False))._history()[..., 0].tolist()
    assert hist == [[50, 51, -1, -1, -1], [7, -1, -1, -1, -1]]


def test_seeded_sampling_in_engine(llm, eos):
    """Seeded requests repeat, another seed differs, lengths honour
    min/max tokens; turn by turn with the outputs kept in context."""
    from vllm.inputs import TokensPrompt

    params = _params(llm, "[S1]Hello there.[S2]你好")
    segs = M.split_speech_text(params)

    def turn(i, context, seed):
        p = _params(llm, segs[i])
        p.context = context
        prompt = M.get_speech_generation_prompt(p)
        sp = M.get_speech_sampling_params(
            p,
            {
                "temperature": 0.6,
                "top_p": 0.9,
                "top_k": 100,
                "repetition_penalty": 1.25,
                "seed": seed,
                "max_tokens": 24,
            },
        )
        return llm.generate(TokensPrompt(**prompt), sp, use_tqdm=False)[0]

    a = turn(0, [], 5).outputs[0].token_ids
    assert a == turn(0, [], 5).outputs[0].token_ids
    assert a != turn(0, [], 6).outputs[0].token_ids
    assert 8 <= len(a) <= 24
    assert eos not in a[:-1]
    b = turn(1, [(segs[0], list(a))], 5)
    n = len(M._turn_ids(llm.llm_engine.model_config, segs[1])[1])
    assert b.prompt_token_ids[-len(a) - n : -n] == list(a)  # S1's turn kept
    frames = M.get_speech_frames(b.outputs[0], llm.llm_engine.model_config)
    assert frames.shape[1] == 1 and (frames >= 0).all() and (frames < 100).all()


def _hf_original_greedy(hf, tok, release_dir, eos, turns, max_new, dialect=None):
    """The original's ``forward_longform`` LLM loop, greedy, on HF
    transformers' Qwen3 with its HF engine's processors (min_new_tokens on
    the speech eos, repetition penalty 1.25 on the generated ids only); with
    ``dialect`` (normalised texts) the speakers' prompts are re-generated
    first, each on its own with the same processors. Returns each turn's
    speech tokens (minus the offset)."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    def generate(inputs):
        with torch.no_grad():
            return hf.generate(
                torch.tensor([inputs]),
                do_sample=False,
                max_new_tokens=max_new,
                min_new_tokens=8,
                eos_token_id=eos,
                pad_token_id=0,
                logits_processor=LogitsProcessorList(
                    [RepetitionPenaltyLogitsProcessor(1.25, len(inputs))]
                ),
            )[0, len(inputs) :].tolist()

    if dialect is None:
        prompts = [
            _original_prompt(tok, release_dir, eos, n, i)
            for i, n in enumerate(("spk_a", "spk_b"))
        ]
    else:
        regen, _ = _original_dialect(tok, release_dir, eos, dialect)
        generated = [generate(x) for x in regen]
        _, prompts = _original_dialect(tok, release_dir, eos, dialect, generated)
    inputs = list(chain.from_iterable(prompts))  # < 10 turns, < 6192 tokens
    out = []
    for spk, text in turns:
        inputs += tok.encode(
            f"<|SPEAKER_{spk}|><|text_start|>{text}<|text_end|><|semantic_token_start|>"
        )
        gen = generate(inputs)
        inputs += gen
        ids = np.asarray(gen[: gen.index(eos)] if eos in gen else gen)
        out.append(ids[(ids >= OFFSET) & (ids < VOCAB)] - OFFSET)
    return out


def test_offline_synthesizer(llm, hf, tok, eos, release_dir):
    """``SpeechSynthesizer``: a two-speaker script turn by turn in context
    (the same greedy tokens as the module's engine run turn by turn), the
    audio the concatenation of the turns. With dialect prompts: the
    speakers' prompts re-generated first, the greedy tokens of an
    independent transcription of the original's loop on HF transformers."""
    from vllm.entrypoints.text_to_speech.offline import SpeechSynthesizer
    from vllm.inputs import TokensPrompt

    script = "[S1]Hello there, friend.[S2]你好[S1]Bye now"
    segs = M.split_speech_text(_params(llm, script))
    want, context = [], []
    for seg in segs:
        p = _params(llm, seg)
        p.context = list(context)
        prompt = M.get_speech_generation_prompt(p)
        sp = M.get_speech_sampling_params(p, {"temperature": 0.0, "max_tokens": 10})
        out = llm.generate(TokensPrompt(**prompt), sp, use_tqdm=False)[0].outputs[0]
        context.append((seg, list(out.token_ids)))
        want.append(M.get_speech_frames(out, llm.llm_engine.model_config))
    tts = SpeechSynthesizer(
        str(release_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        max_num_seqs=4,
        kv_cache_memory_bytes=64 << 20,
        decode_device="cpu",
    )
    (res,) = tts.synthesize(
        [script], voices=["spk_a", "spk_b"], temperature=0.0, max_new_tokens=10
    )
    assert res.segments == segs
    assert np.array_equal(res.frames, np.concatenate(want))
    assert len(res.audio) == len(res.frames) * 960 > 0
    turns = [(0, "Hello there, friend."), (1, "你好。"), (0, "Bye now.")]
    plain = _hf_original_greedy(hf, tok, release_dir, eos, turns, 10)
    assert np.array_equal(res.frames.reshape(-1), np.concatenate(plain))
    (dia,) = tts.synthesize(
        [script],
        voices=["spk_a", "spk_b"],
        temperature=0.0,
        max_new_tokens=10,
        extra_args={"dialect_prompt_text": DIALECT},
    )
    want = _hf_original_greedy(
        hf, tok, release_dir, eos, turns, 10, dialect=DIALECT_NORMALISED
    )
    assert dia.segments == segs  # the re-generated prompts are not spoken
    assert np.array_equal(dia.frames.reshape(-1), np.concatenate(want))
    assert len(dia.audio) == len(dia.frames) * 960 > 0
    assert not np.array_equal(dia.frames, res.frames)
    del tts


def test_prefix_cache_across_turns(llm):
    """Prefix caching stays on (no auxiliary codes): a later turn reuses the
    KV blocks of the context, with the tokens of an uncached run."""
    from vllm.inputs import TokensPrompt

    rng = np.random.default_rng(1)
    segs = M.split_speech_text(_params(llm, "[S1]One two three.[S2]Four five six."))
    context = [(segs[0], [int(t) for t in rng.integers(OFFSET, VOCAB, 300)])]
    p = _params(llm, segs[1])
    p.context = context
    prompt = M.get_speech_generation_prompt(p)
    assert len(prompt["prompt_token_ids"]) > 256  # > 2 KV blocks on CPU
    sp = M.get_speech_sampling_params(p, {"temperature": 0.0, "max_tokens": 16})
    first = llm.generate(TokensPrompt(**prompt), sp, use_tqdm=False)[0]
    again = llm.generate(TokensPrompt(**prompt), sp, use_tqdm=False)[0]
    assert again.num_cached_tokens >= 128
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
