# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""CosyVoice2 LM in vLLM vs the original ``cosyvoice.llm.llm.Qwen2LM``.

Oracle: PyPI ``cosyvoice-minicpmo==0.1.0`` (a copy of the original package at
the CosyVoice2 stage). A tiny random release directory is written in the
original format (``tools/make_cosyvoice2_checkpoint.py``: ``llm.pt`` with the
keys ``Qwen2LM.state_dict()`` saves, ``CosyVoice-BlankEN/``,
``cosyvoice2.yaml``, ``flow.pt``, ``hift.pt``, ``spk2info.pt``); vLLM loads it
as released, the oracle loads the same ``llm.pt`` with ``strict=True``.
"""

import os
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(os.path.realpath(__file__)).parents[3]
sys.path.insert(0, str(REPO / "tools"))

from make_cosyvoice2_checkpoint import (  # noqa: E402
    install_matcha_logger_shim,
    make_release_dir,
)

install_matcha_logger_shim()

from cosyvoice.llm.llm import Qwen2Encoder, Qwen2LM  # noqa: E402
from cosyvoice.utils.common import ras_sampling  # noqa: E402

from vllm.config.text_to_speech import TextToSpeechParams, VoicePrompt  # noqa: E402
from vllm.model_executor.models.cosyvoice2 import (  # noqa: E402
    CosyVoice2ForCausalLM,
    CosyVoice2Vocab,
    ras_distribution,
)

from .cosyvoice_lm_common import check_seeded_sampling  # noqa: E402

# One in-process engine serves the module: keep vLLM's per-test cleanup off.
pytestmark = pytest.mark.skip_global_cleanup

TEXT = "The quick brown fox jumps over the lazy dog."


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory) -> Path:
    return make_release_dir(tmp_path_factory.mktemp("cv2") / "CosyVoice2-tiny")


@pytest.fixture(scope="module")
def ref(release_dir):
    from vllm.transformers_utils.cosyvoice2 import cosyvoice2_config_dict

    conf = cosyvoice2_config_dict(release_dir)
    h, s = conf["hidden_size"], conf["cosyvoice_speech_token_size"]
    lm = Qwen2LM(
        h,
        h,
        s,
        Qwen2Encoder(str(release_dir / "CosyVoice-BlankEN")),
        sampling=partial(ras_sampling, top_p=0.8, top_k=25, win_size=10, tau_r=0.1),
    )
    state = torch.load(release_dir / "llm.pt", map_location="cpu", weights_only=True)
    lm.load_state_dict(state, strict=True)
    # Qwen2Encoder.forward_one_step passes a [1, 1] all-ones attention mask
    # at decode steps. Under the transformers the original pins (4.51), an
    # all-ones mask is dropped (SDPA causal path); transformers 5 instead
    # reads it as "attend to the last key only". Drop all-ones masks as
    # transformers 4.51 did, so that the oracle runs as released.
    hf = lm.llm.model
    orig_forward = hf.forward

    def forward(*args, attention_mask=None, **kwargs):
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        return orig_forward(*args, attention_mask=attention_mask, **kwargs)

    hf.forward = forward
    return lm.float().eval()


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
            max_model_len=1024,
            max_num_seqs=4,
            max_logprobs=200,
            kv_cache_memory_bytes=64 << 20,
        )
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old


def _params(llm, text=TEXT, voice=None, speaker=None, **extra):
    return TextToSpeechParams(
        text=text,
        model_config=llm.llm_engine.model_config,
        voice=voice,
        speaker=speaker,
        extra=extra,
    )


def _ref_greedy(ref, text_ids, prompt_text_ids=(), prompt_speech=()):
    """The original inference loop, greedy: sampling_ids returns the argmax
    (eos excluded while ignore_eos, i.e. below min_len). Returns tokens and
    the log-probs of every step."""
    steps: list[torch.Tensor] = []
    s = ref.speech_token_size

    def sampling_ids(weighted_scores, decoded_tokens, sampling, ignore_eos=True):
        steps.append(weighted_scores.detach().clone())
        w = weighted_scores.clone()
        if ignore_eos:
            w[s] = float("-inf")
        return w.argmax().reshape(1)

    ref.sampling_ids = sampling_ids
    i32 = torch.int32
    toks = list(
        ref.inference(
            text=torch.tensor([text_ids], dtype=i32),
            text_len=torch.tensor([len(text_ids)], dtype=i32),
            prompt_text=torch.tensor([list(prompt_text_ids)], dtype=i32).reshape(1, -1),
            prompt_text_len=torch.tensor([len(prompt_text_ids)], dtype=i32),
            prompt_speech_token=torch.tensor([list(prompt_speech)], dtype=i32).reshape(
                1, -1
            ),
            prompt_speech_token_len=torch.tensor([len(prompt_speech)], dtype=i32),
            embedding=torch.zeros(1, 192),
        )
    )
    del ref.sampling_ids
    return [int(t) for t in toks], steps


# ----------------------------------------------------------------- config
def test_config_from_release_dir(release_dir):
    from vllm.transformers_utils.config import get_config

    cfg = get_config(str(release_dir), trust_remote_code=False)
    assert cfg.architectures == ["CosyVoice2ForCausalLM"]
    assert cfg.cosyvoice_text_vocab_size == 640
    assert cfg.cosyvoice_speech_token_size == 100
    assert cfg.vocab_size == 640 + 2 + 103
    assert cfg.tie_word_embeddings is False
    assert cfg.cosyvoice_sampling == {
        "top_p": 0.8,
        "top_k": 25,
        "win_size": 10,
        "tau_r": 0.1,
    }
    v = CosyVoice2Vocab(cfg)
    assert (v.sos, v.task_id, v.speech_offset) == (640, 641, 642)
    assert v.stop_token_ids == [742, 743, 744]


def test_tokenizer_matches_original(llm, release_dir):
    try:
        import whisper  # noqa: F401
    except ImportError:  # only its tiktoken tokenizer (CosyVoice1) uses it
        sys.modules["whisper"] = types.ModuleType("whisper")
        sys.modules["whisper.tokenizer"] = types.ModuleType("whisper.tokenizer")
        sys.modules["whisper.tokenizer"].Tokenizer = object
    from cosyvoice.tokenizer.tokenizer import QwenTokenizer

    orig = QwenTokenizer(str(release_dir / "CosyVoice-BlankEN"))
    mc = llm.llm_engine.model_config
    for text in (TEXT, "hello<|endofprompt|>[breath] world", "你好"):
        assert CosyVoice2ForCausalLM._text_ids(mc, text) == orig.encode(text)
    # the engine's own tokenizer is the release's CosyVoice-BlankEN/ one
    assert llm.get_tokenizer().encode("hello", add_special_tokens=False)


# ----------------------------------------------------------------- prompts
def test_prompt_layouts(llm):
    mc = llm.llm_engine.model_config
    v = CosyVoice2Vocab(mc.hf_config)
    tid = partial(CosyVoice2ForCausalLM._text_ids, mc)
    text = tid(TEXT)
    ids = lambda p: CosyVoice2ForCausalLM.get_speech_generation_prompt(p)[  # noqa: E731
        "prompt_token_ids"
    ]

    assert ids(_params(llm)) == [v.sos] + text + [v.task_id]
    voice = VoicePrompt(ref_text="hello world", codes=np.array([3, 1, 4, 1, 5]))
    zs = ids(_params(llm, voice=voice))
    assert zs == (
        [v.sos]
        + tid("hello world")
        + text
        + [v.task_id]
        + [v.speech_offset + t for t in (3, 1, 4, 1, 5)]
    )
    assert ids(_params(llm, voice=voice, mode="cross_lingual")) == [v.sos] + text + [
        v.task_id
    ]
    assert ids(_params(llm, voice=voice, instruct_text="speak slowly")) == [
        v.sos
    ] + tid("speak slowly<|endofprompt|>") + text + [v.task_id]
    # spk2info.pt speakers: zero-shot entry and SFT entry
    assert CosyVoice2ForCausalLM.get_speech_presets(mc) == ["spk_a", "spk_sft"]
    p = _params(llm, speaker="spk_a")
    spk = torch.load(Path(mc.model) / "spk2info.pt", weights_only=True)["spk_a"]
    sp = spk["llm_prompt_speech_token"][0].tolist()
    assert ids(p) == (
        [v.sos] + [5, 6, 7, 8] + text + [v.task_id] + [v.speech_offset + t for t in sp]
    )
    assert p.voice is not None and p.voice.extra["prompt_feat"].shape == (24, 80)
    p = _params(llm, speaker="spk_sft")
    assert ids(p) == [v.sos] + text + [v.task_id]
    assert p.voice.codes is None and p.voice.extra["embedding"].shape == (192,)

    with pytest.raises(ValueError, match="speech tokens"):
        ids(_params(llm, voice=VoicePrompt(ref_text="x", codes=np.array([100]))))
    with pytest.raises(ValueError, match="unknown mode"):
        ids(_params(llm, mode="sing"))

    sp = CosyVoice2ForCausalLM.get_speech_sampling_params(
        _params(llm), {"temperature": 1.0, "max_tokens": 10_000}
    )
    assert sp.min_tokens == 2 * len(text) and sp.max_tokens == 20 * len(text)
    assert sp.stop_token_ids == v.stop_token_ids
    sp = CosyVoice2ForCausalLM.get_speech_sampling_params(
        _params(llm), {"max_tokens": 5}
    )
    assert (sp.min_tokens, sp.max_tokens) == (5, 5)


# ----------------------------------------------------------------- parity
@pytest.mark.parametrize("mode", ["plain", "zero_shot"])
def test_greedy_tokens_and_logits_match_original(llm, ref, mode):
    from vllm.inputs import TokensPrompt

    mc = llm.llm_engine.model_config
    v = CosyVoice2Vocab(mc.hf_config)
    text = TEXT + " Pack my box with five dozen liquor jugs."
    voice = None
    prompt_text, prompt_speech = [], []
    if mode == "zero_shot":
        voice = VoicePrompt(
            ref_text="hello world", codes=np.array([7, 70, 17, 99, 0, 42])
        )
        prompt_text = CosyVoice2ForCausalLM._text_ids(mc, "hello world")
        prompt_speech = voice.codes.tolist()
    params = _params(llm, text=text, voice=voice)
    prompt = CosyVoice2ForCausalLM.get_speech_generation_prompt(params)
    sp = CosyVoice2ForCausalLM.get_speech_sampling_params(
        params, {"temperature": 0.0, "max_tokens": 4096}
    )
    sp.logprobs = v.num_speech_rows
    text_ids = CosyVoice2ForCausalLM._text_ids(mc, text)
    assert sp.min_tokens >= 32

    want, steps = _ref_greedy(ref, text_ids, prompt_text, prompt_speech)
    out = llm.generate(TokensPrompt(**prompt), sp, use_tqdm=False)[0].outputs[0]
    got = CosyVoice2ForCausalLM.get_speech_frames(out, mc)[:, 0].tolist()
    assert len(want) >= 32
    assert got == want
    if len(want) < sp.max_tokens:  # the original stopped on eos
        assert out.token_ids[-1] == v.eos and out.finish_reason == "stop"
    # per-step log-probs over the whole speech vocabulary
    errs = []
    for i, lp in enumerate(out.logprobs[: len(steps)]):
        ours = torch.tensor(
            [lp[v.speech_offset + j].logprob for j in range(v.num_speech_rows)]
        )
        errs.append(rel_err(ours, steps[i]))
    print(f"{mode}: {len(want)} tokens, max log-prob rel. error {max(errs):.2e}")
    assert max(errs) < 1e-3


def test_batch_equals_single(llm):
    from vllm.inputs import TokensPrompt

    texts = [TEXT, "hello world", "Pack my box with five dozen liquor jugs."]
    prompts, params = [], []
    for t in texts:
        p = _params(llm, text=t)
        prompts.append(
            TokensPrompt(**CosyVoice2ForCausalLM.get_speech_generation_prompt(p))
        )
        params.append(
            CosyVoice2ForCausalLM.get_speech_sampling_params(
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


# -------------------------------------------------------------------- RAS
def _orig_law(ref, scores, decoded, ignore_eos, n, seed):
    torch.manual_seed(seed)
    counts = torch.zeros(scores.shape[0])
    for _ in range(n):
        if ignore_eos is None:
            t = ras_sampling(scores, decoded, 25)
        else:
            t = ref.sampling_ids(scores, decoded, 25, ignore_eos=ignore_eos)
        counts[int(t)] += 1
    return counts / n


@pytest.mark.parametrize("case", ["no_repeat", "repeat", "min_len"])
def test_ras_distribution_matches_original(ref, case):
    """The vectorised RAS law equals the original sampler's empirical
    distribution (nucleus top-p 0.8 / top-k 25, window 10, tau 0.1, eos
    rejected below min_len)."""
    s = ref.speech_token_size
    g = torch.Generator().manual_seed(3)
    scores = (torch.randn(s + 3, generator=g) * 2.0).log_softmax(-1)
    order = scores.argsort(descending=True).tolist()
    decoded = [7, 8, 9]
    if case == "repeat":  # the two most likely tokens were generated lately
        decoded = [order[0], 5, order[1]] + decoded
    banned = None
    if case == "min_len":
        scores[s] = scores.max() + 1.0  # eos is the most likely token
        banned = torch.zeros(1, s + 3, dtype=torch.bool)
        banned[0, s:] = True
    hist = torch.tensor([decoded[-10:] + [-1] * (10 - len(decoded[-10:]))])
    law = ras_distribution(
        scores[None].float(),
        hist,
        torch.tensor([0.8]),
        torch.tensor([25]),
        10,
        0.1,
        banned,
    )[0]
    law = law / law.sum()
    emp = _orig_law(
        ref, scores, decoded, True if case == "min_len" else None, n=6000, seed=0
    )
    assert (law - emp).abs().max() < 0.025
    # support: outside the nucleus only through the repetition fallback
    if case == "no_repeat":
        assert (law > 0).sum() <= 25
    if case == "min_len":
        assert law[s] == 0 and emp[s] == 0


def test_ras_banned_nucleus_falls_back():
    """Below min_len with a nucleus of eos alone the original raises after
    100 retries; here the draw comes from the rest of the softmax."""
    scores = torch.tensor([[0.0, 1.0, 9.0, -1.0]])
    banned = torch.tensor([[False, False, True, False]])
    law = ras_distribution(
        scores,
        torch.full((1, 10), -1),
        torch.tensor([0.8]),
        torch.tensor([25]),
        10,
        0.1,
        banned,
    )[0]
    assert law[2] == 0 and law.sum() > 0
    want = scores[0].softmax(-1).masked_fill(banned[0], 0.0)
    torch.testing.assert_close(law / law.sum(), want / want.sum())


def test_seeded_ras_sampling_in_engine(llm):
    """Sampling (RAS through the runner's model-sampler hook) is seeded per
    request, never yields non-speech ids and honours min/max lengths."""
    mc = llm.llm_engine.model_config
    check_seeded_sampling(
        llm, CosyVoice2ForCausalLM, CosyVoice2Vocab(mc.hf_config), _params(llm)
    )


def test_bad_llm_pt(release_dir, tmp_path):
    import shutil

    from vllm import LLM

    bad = tmp_path / "bad"
    shutil.copytree(release_dir, bad)
    state = torch.load(bad / "llm.pt", weights_only=True)
    del state["llm_embedding.weight"]
    torch.save(state, bad / "llm.pt")
    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        with pytest.raises(Exception) as e:
            LLM(
                model=str(bad),
                dtype="float32",
                enforce_eager=True,
                max_model_len=128,
                kv_cache_memory_bytes=16 << 20,
            )
        assert "llm_embedding" in str(e.value) or "llm_embedding" in repr(
            e.value.__cause__
        )
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old


def test_reference_encoding(release_dir):
    """Zero-shot frontend (onnxruntime on the directory's speech tokenizer and
    CAM++ graphs): 25 Hz tokens, 2 prompt-mel frames (50 Hz, 80 bins) per
    token after the original's trimming, a 192-d x-vector."""
    pytest.importorskip("onnxruntime")
    from vllm.model_executor.models.cosyvoice2 import CosyVoice2Frontend

    fe = CosyVoice2Frontend(str(release_dir))
    t = np.arange(int(1.5 * 16000)) / 16000
    audio = (0.4 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32)
    v = fe.encode(audio, 16000, "a reference")
    n = len(v.codes)
    assert n == 37  # min(75 mel frames // 2, ceil(150 whisper frames / 4))
    assert v.codes.min() >= 0 and v.codes.max() < 100
    assert v.extra["prompt_feat"].shape == (2 * n, 80)
    assert v.extra["embedding"].shape == (192,)
    assert np.isfinite(v.extra["prompt_feat"]).all()
    with pytest.raises(ValueError, match="16 kHz"):
        fe.encode(audio, 24000, "x")


def test_model_sampler_uses_history(llm):
    """``sample_codebooks`` (the runner's model-sampler hook) reads each
    row's recent tokens from ``history`` (unified ids, -1 padded): a token
    repeated in the window falls back to the full softmax."""

    def run(model):
        from vllm.v1.sample.logits_processor import LogitsProcessors
        from vllm.v1.sample.metadata import SamplingMetadata

        v = model.vocab
        rows = 2000
        speech = torch.full((v.num_speech_rows,), -1.0)
        # p(5) = 0.85 >= top_p: the nucleus is {5} alone
        speech[5] = np.log(0.85 * (v.num_speech_rows - 1) / 0.15) - 1.0
        logits = torch.full((rows, v.vocab_size), float("-inf"))
        logits[:, v.speech_offset :] = speech
        hist = torch.full((rows, 10, 1), -1, dtype=torch.long)
        hist[rows // 2 :, 3, 0] = v.speech_offset + 5  # token 5 seen lately
        full = lambda x: torch.full((rows,), x)  # noqa: E731
        md = SamplingMetadata(
            temperature=full(1.0),
            all_greedy=False,
            all_random=True,
            top_p=full(0.8),
            top_k=torch.full((rows,), 25),
            generators={},
            max_num_logprobs=None,
            no_penalties=True,
            prompt_token_ids=None,
            frequency_penalties=full(0.0),
            presence_penalties=full(0.0),
            repetition_penalties=full(1.0),
            output_token_ids=[[] for _ in range(rows)],
            allowed_token_ids_mask=None,
            bad_words_token_ids={},
            logitsprocs=LogitsProcessors(),
        )
        torch.manual_seed(0)
        ids, aux = model.sample_codebooks(logits, torch.zeros(rows, 8), md, hist)
        return ids.cpu(), aux.shape

    ids, aux_shape = llm.apply_model(run)[0]
    v = CosyVoice2Vocab(llm.llm_engine.model_config.hf_config)
    assert aux_shape == (2000, 0)
    assert ((ids >= v.speech_offset) & (ids < v.vocab_size)).all()
    fresh = (ids[:1000] == v.speech_offset + 5).float().mean().item()
    repeated = (ids[1000:] == v.speech_offset + 5).float().mean().item()
    assert fresh == 1.0
    assert abs(repeated - 0.85) < 0.04  # full-softmax fallback


def test_min_length_and_eos_match_original(llm, ref, release_dir, tmp_path):
    """With eos made the most likely token, both stop right at min_len
    (2 x the text tokens): eos is held back before it, as the original's
    retry loop does, and ends the request after it."""
    import copy
    import shutil

    from vllm import LLM
    from vllm.inputs import TokensPrompt

    eos_dir = tmp_path / "eos"
    shutil.copytree(release_dir, eos_dir)
    state = torch.load(eos_dir / "llm.pt", weights_only=True)
    s = ref.speech_token_size
    state["llm_decoder.bias"][s] += 12.0
    torch.save(state, eos_dir / "llm.pt")
    ref_eos = copy.deepcopy(ref)
    ref_eos.load_state_dict(state, strict=True)

    eos_llm = LLM(
        model=str(eos_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=2,
        kv_cache_memory_bytes=32 << 20,
    )
    mc = eos_llm.llm_engine.model_config
    params = _params(llm, text="hello world")
    params.model_config = mc
    prompt = CosyVoice2ForCausalLM.get_speech_generation_prompt(params)
    sp = CosyVoice2ForCausalLM.get_speech_sampling_params(
        params, {"temperature": 0.0, "max_tokens": 4096}
    )
    text_ids = CosyVoice2ForCausalLM._text_ids(mc, "hello world")
    want, _ = _ref_greedy(ref_eos, text_ids)
    out = eos_llm.generate(TokensPrompt(**prompt), sp, use_tqdm=False)[0].outputs[0]
    got = CosyVoice2ForCausalLM.get_speech_frames(out, mc)[:, 0].tolist()
    assert len(want) == sp.min_tokens == 2 * len(text_ids)
    assert got == want
    assert out.finish_reason == "stop" and len(out.token_ids) == len(want) + 1
    # seeded RAS stops at min_len too (eos dominates the nucleus)
    sp2 = CosyVoice2ForCausalLM.get_speech_sampling_params(
        params,
        {"temperature": 1.0, "top_p": 0.8, "top_k": 25, "seed": 0, "max_tokens": 4096},
    )
    out2 = eos_llm.generate(TokensPrompt(**prompt), sp2, use_tqdm=False)[0].outputs[0]
    assert len(out2.token_ids) == sp2.min_tokens + 1
    del eos_llm


def test_offline_synthesizer(release_dir):
    """``SpeechSynthesizer`` (offline API): default voice, a spk2info preset
    (its prompt conditions the flow too) and a zero-shot voice."""
    from vllm.entrypoints.text_to_speech.offline import SpeechSynthesizer

    tts = SpeechSynthesizer(
        str(release_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=4,
        kv_cache_memory_bytes=32 << 20,
    )
    assert tts.sample_rate == 24000
    plain, spk = (
        tts.synthesize(["hello world"], temperature=0.0)[0],
        tts.synthesize(["hello world"], speaker="spk_a", temperature=0.0)[0],
    )
    for out in (plain, spk):
        assert out.audio.size == len(out.frames) * 960 > 0
        assert np.isfinite(out.audio).all()
    assert not np.array_equal(plain.frames, spk.frames)
    # same tokens, preset voice vs none: the flow is conditioned on the preset
    a = tts.decoder.decode([spk.frames], [None])[0]
    assert not np.allclose(a, spk.audio)
    t = np.arange(16000) / 16000
    voice = tts.encode_voice(
        (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32),
        "a reference",
        sample_rate=16000,
    )
    zs = tts.synthesize(["hello world"], voice=voice, temperature=0.0)[0]
    assert zs.audio.size == len(zs.frames) * 960 > 0
