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


def test_offline_synthesizer(llm, release_dir):
    """``SpeechSynthesizer``: a two-speaker script turn by turn in context
    (the same greedy tokens as the module's engine run turn by turn), the
    audio the concatenation of the turns."""
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
