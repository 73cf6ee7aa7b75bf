# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Fish Speech dual-AR LM (FishSpeechForCausalLM) against the original code
(PyPI ``fish_speech==0.1.0`` = the OpenAudio S1 code state) on a tiny random
checkpoint written in the S1 release layout by ``tools/make_fish_checkpoint.py``.

CPU, fp32: slow log-probs and fast logits within 1e-3, identical greedy
main tokens + codebooks for >= 32 frames (plain and zero-shot prompts with
reference codes), tokenizer ids, config fallbacks, bad checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
TOOLS = ROOT / "tools"
if not TOOLS.is_dir():  # staged tree: tests are symlinked from the repo
    TOOLS = Path(os.path.realpath(__file__)).parents[3] / "tools"
sys.path.insert(0, str(TOOLS))

# One in-process engine per module: keep its distributed state between tests
pytestmark = pytest.mark.skip_global_cleanup

STEPS = 40
RP = 1.2


@pytest.fixture(scope="module")
def s1_ckpt(tmp_path_factory) -> Path:
    from make_fish_checkpoint import make_s1

    out = tmp_path_factory.mktemp("fish") / "s1"
    make_s1(out, seed=0, dtype=torch.float32)
    return out


@pytest.fixture(scope="module")
def ref(s1_ckpt):
    from make_fish_checkpoint import import_reference_llama

    llama = import_reference_llama()
    model = llama.DualARTransformer.from_pretrained(str(s1_ckpt), load_weights=True)
    return model.float().eval()


@pytest.fixture(scope="module")
def llm(s1_ckpt):
    from vllm import LLM

    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # apply_model
    try:
        yield LLM(
            model=str(s1_ckpt),
            dtype="float32",
            enforce_eager=True,
            max_model_len=512,
            max_num_seqs=4,
            max_logprobs=20,
            kv_cache_memory_bytes=64 << 20,
        )
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old


def _encode(ref, text: str, refs: list[tuple[str, torch.Tensor]] = ()):
    """The original S1 prompt (generate_long): values [N+1, T]."""
    from fish_speech.content_sequence import ContentSequence, TextPart, VQPart

    seq = ContentSequence(modality="interleave")
    for t, codes in refs:
        seq.append([TextPart(text=t), VQPart(codes=codes)], add_end=True, speaker=0)
    seq.append([TextPart(text=text)], add_end=False, speaker=0)
    values, _, _ = seq.encode_for_inference(
        ref.tokenizer, num_codebooks=ref.config.num_codebooks
    )
    return values


def _vllm_prompt(values: torch.Tensor):
    """TokensPrompt + prompt_aux_codes rows from the original's values."""
    ids = values[0].tolist()
    rows = [
        [p] + values[2:, p].tolist()
        for p in range(values.shape[1])
        if bool(values[2:, p].any())
    ]
    return ids, rows


def _ref_generate(ref, values: torch.Tensor, steps: int, rp: float):
    from fish_speech.models.text2semantic.inference import generate

    ref.max_seq_len = -1  # fresh caches
    with torch.no_grad():
        y = generate(
            model=ref,
            prompt=values.clone(),
            max_new_tokens=steps,
            audio_masks=None,
            audio_parts=None,
            temperature=torch.tensor(0.7),
            top_p=torch.tensor(1e-6),  # keeps only the top token: greedy
            repetition_penalty=torch.tensor(rp),
        )
    return y[:, values.shape[1] :]  # [N+1, frames]: tok, c0, c1..


def _params(rows, steps=STEPS, rp=RP, logprobs=None):
    from vllm import SamplingParams

    return SamplingParams(
        temperature=0.0,
        max_tokens=steps,
        repetition_penalty=rp,
        detokenize=False,
        logprobs=logprobs,
        extra_args={"prompt_aux_codes": rows} if rows else None,
    )


def _ref_codes(ref, n_frames=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    c0 = torch.randint(0, ref.config.codebook_size, (1, n_frames), generator=g)
    rest = torch.randint(0, 1024, (ref.config.num_codebooks - 1, n_frames), generator=g)
    return torch.cat([c0, rest]).int()


# --------------------------------------------------------------------------


def test_tokenizer_matches_original(s1_ckpt, ref):
    from vllm.tokenizers.fish_speech import FishSpeechTokenizer
    from vllm.tokenizers.registry import get_tokenizer

    tok = get_tokenizer(str(s1_ckpt))
    assert isinstance(tok, FishSpeechTokenizer)
    for text in [
        "hello the world, and this is it!",
        "<|interleave|><|speaker:0|>hello<|im_end|><|semantic:7|>",
        "Ünïcödé 你好 123 \n\n  x",
    ]:
        assert tok.encode(text) == ref.tokenizer.encode(text)
        assert tok.decode(tok.encode(text)) == ref.tokenizer.decode(
            ref.tokenizer.encode(text)
        )
    assert tok.semantic_begin_id == ref.tokenizer.semantic_begin_id
    assert tok.semantic_end_id == ref.tokenizer.semantic_end_id
    assert tok.eos_token_id == ref.tokenizer.get_token_id("<|im_end|>")


def test_config_fallbacks(tmp_path):
    from vllm.transformers_utils.configs.fish_speech import (
        FishQwen3OmniConfig,
        FishSpeechConfig,
    )

    # 1.5: no attention_qk_norm key -> head_dim forced to dim // n_head
    c = FishSpeechConfig(dim=1024, n_head=16, head_dim=128, n_local_heads=-1)
    assert c.fish_version == "1.5" and c.head_dim == 64
    assert c.n_local_heads == 16 and c.intermediate_size == 2816
    assert c.fast_dim == 1024 and c.fast_n_head == 16 and c.fast_head_dim == 64
    assert c.architectures == ["FishSpeechForCausalLM"]
    assert c.hidden_size == 1024 and c.num_key_value_heads == 16
    # S1: keeps head_dim (default 64 when absent), qk-norm fallbacks
    c = FishSpeechConfig(
        dim=1024, n_head=16, head_dim=128, attention_qk_norm=True, fast_dim=512
    )
    assert c.fish_version == "s1" and c.head_dim == 128
    assert c.fast_attention_qk_norm is True and c.fast_dim == 512
    assert FishSpeechConfig(dim=1024, n_head=16, attention_qk_norm=True).head_dim == 64
    # round trip keeps the version
    c2 = FishSpeechConfig(**c.to_dict())
    assert c2.fish_version == "s1" and c2.head_dim == 128
    # S2 nested
    s2 = FishQwen3OmniConfig(
        text_config=dict(vocab_size=100, n_layer=2, n_head=4, dim=64, head_dim=32),
        audio_decoder_config=dict(vocab_size=16, num_codebooks=4, n_layer=1),
        semantic_start_token_id=50,
        semantic_end_token_id=65,
        eos_token_id=3,
    )
    assert s2.scale_codebook_embeddings and s2.norm_fastlayer_input
    assert s2.codebook_size == 16 and s2.fast_dim == 64 and s2.head_dim == 32
    assert s2.semantic_begin_id == 50 and s2.im_end_id == 3


def test_config_from_release_dir(s1_ckpt):
    from vllm.transformers_utils.config import get_config

    cfg = get_config(str(s1_ckpt), trust_remote_code=False)
    raw = json.loads((s1_ckpt / "config.json").read_text())
    assert "architectures" not in raw
    assert cfg.architectures == ["FishSpeechForCausalLM"]
    assert cfg.head_dim == raw["head_dim"] and cfg.fish_version == "s1"


def test_slow_logprobs_match_original(llm, ref):
    """Prefill log-probs (top 20) equal the original's log_softmax."""
    from vllm.inputs import TokensPrompt

    values = _encode(ref, "hello the world")
    ids, rows = _vllm_prompt(values)
    out = llm.generate(
        TokensPrompt(prompt_token_ids=ids),
        _params(rows, steps=1, logprobs=20),
        use_tqdm=False,
    )[0]
    lp = out.outputs[0].logprobs[0]
    with torch.no_grad():
        ref.setup_caches(1, ref.config.max_seq_len, torch.float32)
        res = ref.forward_generate(values[None], torch.arange(values.shape[1]))
    want = torch.log_softmax(res.logits[0, -1].float(), -1)
    got_ids = list(lp)
    got = torch.tensor([lp[i].logprob for i in got_ids])
    torch.testing.assert_close(got, want[got_ids], rtol=1e-3, atol=1e-4)
    assert got_ids[0] == int(want.argmax())


def test_fast_logits_match_original(llm, ref):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, ref.config.dim, generator=g)
    codes = torch.randint(0, 1024, (3, ref.config.num_codebooks), generator=g)

    def run(model, hidden=hidden, codes=codes):
        with torch.no_grad():
            x0 = model.fast_input(hidden)
            caches = model._new_fast_caches(3, x0)
            x = torch.stack([x0, model.fast_embeddings(codes[:, 0])], 1)
            outs, pos = [], 0
            for k in range(1, model.num_codebooks):
                outs.append(model.fast_logits(x, pos, caches))
                pos += x.shape[1]
                x = model.fast_embeddings(codes[:, k])[:, None]
        return torch.stack(outs, 1).cpu()

    got = llm.apply_model(run)[0]
    with torch.no_grad():
        ref.setup_caches(3, ref.config.max_seq_len, torch.float32)
        for layer in ref.fast_layers:
            layer.attention.kv_cache.k_cache.zero_()
            layer.attention.kv_cache.v_cache.zero_()
        ref.forward_generate_fast(hidden[:, None], torch.tensor([0]))
        want = []
        for k in range(1, ref.config.num_codebooks):
            x = ref.fast_embeddings(codes[:, k - 1])
            want.append(ref.forward_generate_fast(x, torch.tensor([k]))[:, 0])
    torch.testing.assert_close(got, torch.stack(want, 1).float(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("zero_shot", [False, True])
def test_greedy_codes_match_original(llm, ref, zero_shot):
    from vllm.inputs import TokensPrompt

    refs = [("and this is the", _ref_codes(ref))] if zero_shot else []
    values = _encode(ref, "hello the world and the thing", refs)
    want = _ref_generate(ref, values, STEPS, RP)
    ids, rows = _vllm_prompt(values)
    assert bool(rows) == zero_shot
    out = llm.generate(
        TokensPrompt(prompt_token_ids=ids), _params(rows), use_tqdm=False
    )[0].outputs[0]
    n = want.shape[1]
    assert n >= 32, "the reference stopped early; pick another prompt"
    assert list(out.token_ids)[:n] == want[0].tolist()
    assert out.aux_token_ids[:n].tolist() == want[2:].T.tolist()
    sb = ref.tokenizer.semantic_begin_id
    assert any(t >= sb for t in out.token_ids), "no semantic frame generated"


def test_batch_equals_single(llm, ref):
    from vllm.inputs import TokensPrompt

    prompts = [
        _vllm_prompt(_encode(ref, t, r))
        for t, r in [("hello", []), ("the and", [("is it", _ref_codes(ref, 5, 1))])]
    ]
    batch = llm.generate(
        [TokensPrompt(prompt_token_ids=i) for i, _ in prompts],
        [_params(r, steps=16) for _, r in prompts],
        use_tqdm=False,
    )
    for (ids, rows), b in zip(prompts, batch):
        one = llm.generate(
            TokensPrompt(prompt_token_ids=ids), _params(rows, steps=16), use_tqdm=False
        )[0]
        assert b.outputs[0].token_ids == one.outputs[0].token_ids
        assert (
            b.outputs[0].aux_token_ids.tolist() == one.outputs[0].aux_token_ids.tolist()
        )


def test_seeded_sampling_reproducible(llm, ref):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids, _ = _vllm_prompt(_encode(ref, "hello"))
    p = SamplingParams(
        temperature=0.8,
        top_p=0.8,
        repetition_penalty=1.1,
        max_tokens=12,
        seed=7,
        detokenize=False,
    )
    a, b = llm.generate(
        [TokensPrompt(prompt_token_ids=ids)] * 2, [p, p], use_tqdm=False
    )
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert a.outputs[0].aux_token_ids.tolist() == b.outputs[0].aux_token_ids.tolist()
    assert (a.outputs[0].aux_token_ids < 1024).all()  # S1 residual-code limit


def _load_error(ckpt: Path) -> str:
    """Build the model on a broken checkpoint (in-process engine, so the
    error itself reaches the test); return the error text."""
    from vllm import LLM

    with pytest.MonkeyPatch.context() as mp, pytest.raises(Exception) as e:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        LLM(
            model=str(ckpt),
            dtype="float32",
            enforce_eager=True,
            max_model_len=128,
            kv_cache_memory_bytes=16 << 20,
        )
    msg = str(e.value) + repr(e.value.__cause__) + repr(e.value.__context__)
    return msg


def test_bad_checkpoints(s1_ckpt, tmp_path):
    # missing weights: the loader names them
    sd = torch.load(s1_ckpt / "model.pth", weights_only=True)
    sd.pop("layers.1.attention.wqkv.weight")
    broken = tmp_path / "missing"
    shutil.copytree(s1_ckpt, broken)
    torch.save(sd, broken / "model.pth")
    assert "layers.1.attention.wqkv" in _load_error(broken)
    # no tokenizer.tiktoken: the semantic ids cannot be known
    no_tok = tmp_path / "no_tok"
    shutil.copytree(s1_ckpt, no_tok)
    (no_tok / "tokenizer.tiktoken").unlink()
    assert "tokenizer.tiktoken" in _load_error(no_tok)
    # malformed tiktoken file
    bad = tmp_path / "bad_tok"
    shutil.copytree(s1_ckpt, bad)
    (bad / "tokenizer.tiktoken").write_text("not-a-rank-line\n")
    with pytest.raises(ValueError, match="expected 'base64 rank'"):
        from vllm.tokenizers.fish_speech import FishSpeechTokenizer

        FishSpeechTokenizer.from_pretrained(bad)


def test_sampler_matches_original_logits_to_probs():
    """Penalty window, top-p before temperature: the same probabilities as
    the original ``logits_to_probs`` (row by row, bf16-cast params as S1's
    ``generate`` passes them)."""
    from make_fish_checkpoint import import_reference_llama

    import_reference_llama()
    from fish_speech.models.text2semantic.inference import logits_to_probs

    from vllm.model_executor.models.fish_speech import _fish_penalize, _fish_probs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=g) * 3
    prev = torch.randint(0, 300, (4, 16), generator=g)
    prev[:, :5] = prev[:, 5:10]  # repeated ids: penalised once
    temp = torch.tensor([0.7, 0.8, 1.0, 1.3])
    top_p = torch.tensor([0.7, 0.8, 0.95, 1.0])
    rp = torch.tensor([1.5, 1.1, 1.2, 1.0])
    b = lambda x: x.to(torch.bfloat16).float()  # noqa: E731
    got = _fish_probs(_fish_penalize(logits.clone(), b(rp), prev), b(temp), b(top_p))
    for r in range(4):
        want = logits_to_probs(
            logits[r].clone(),
            temperature=temp[r].to(torch.bfloat16),
            top_p=top_p[r].to(torch.bfloat16),
            repetition_penalty=rp[r].to(torch.bfloat16),
            previous_tokens=prev[r],
        )
        torch.testing.assert_close(got[r], want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("im_end", [5, 290])  # before / after the semantic range
def test_s2_slow_token_on_allowed_ids_equals_masked_vocab(im_end, monkeypatch):
    """S2's slow token sampled over the allowed ids only (the semantic range
    and <|im_end|>) gives the ids of ``_s2_sample`` over the whole vocabulary
    with the other entries at -inf, for the same noise: greedy and sampled
    rows, with and without top-k."""
    import vllm.model_executor.models.fish_speech as fish

    g = torch.Generator().manual_seed(im_end)
    rows, vocab = 12, 300
    ids = torch.cat([torch.arange(100, 228), torch.tensor([im_end])]).unique()
    logits = torch.randn(rows, vocab, generator=g) * 3
    logits[3, im_end] = 20.0  # a row that ends
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[ids] = True
    masked = logits.masked_fill(~allowed, float("-inf"))
    temperature = torch.rand(rows, generator=g) + 0.3
    top_p = torch.rand(rows, generator=g) * 0.9 + 0.05
    greedy = torch.zeros(rows, dtype=torch.bool)
    greedy[:3] = True
    noise = torch.empty(rows, vocab).exponential_(1, generator=g)
    for top_k in (None, torch.randint(1, 40, (rows,), generator=g)):
        monkeypatch.setattr(fish, "_exp_noise", lambda like, gens: noise)
        want = fish._s2_sample(masked, greedy, temperature, top_p, top_k, {})
        monkeypatch.setattr(fish, "_exp_noise", lambda like, gens: noise[:, ids])
        got = fish._sample_allowed(logits, ids, greedy, temperature, top_p, top_k, {})
        assert torch.equal(got, want)
        assert got[3] == im_end and bool(allowed[got].all())
        # another noise: other draws for the sampled rows
        monkeypatch.setattr(
            fish, "_exp_noise", lambda like, gens: noise.flip(0)[:, ids]
        )
        other = fish._sample_allowed(logits, ids, greedy, temperature, top_p, top_k, {})
        assert torch.equal(other[:3], want[:3]) and not torch.equal(other, want)


def test_converted_checkpoint_same_codes(s1_ckpt, ref, tmp_path):
    """tools/convert_fish_checkpoint.py output (safetensors + HF-style
    config.json) loads in the same model and generates the same codes."""
    from convert_fish_checkpoint import convert

    from vllm import LLM
    from vllm.inputs import TokensPrompt

    out = tmp_path / "conv"
    convert(s1_ckpt, out, None, 4.0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["FishSpeechForCausalLM"]
    assert cfg["semantic_begin_id"] == ref.tokenizer.semantic_begin_id
    assert not (out / "model.pth").exists()
    values = _encode(ref, "hello the world and the thing")
    want = _ref_generate(ref, values, 32, RP)
    ids, rows = _vllm_prompt(values)
    conv = LLM(
        model=str(out),
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        kv_cache_memory_bytes=32 << 20,
    )
    try:
        o = conv.generate(
            TokensPrompt(prompt_token_ids=ids), _params(rows, steps=32), use_tqdm=False
        )[0].outputs[0]
    finally:
        del conv
    n = want.shape[1]
    assert list(o.token_ids)[:n] == want[0].tolist()
    assert o.aux_token_ids[:n].tolist() == want[2:].T.tolist()


FIXTURES = Path(os.path.realpath(__file__)).parent / "fixtures" / "fish_lm"


@pytest.mark.parametrize("kind", ["v15", "s2"])
def test_golden_fixtures(kind, tmp_path):
    """fish-speech-1.5 (model.pth, 1.5 special-token order, forced head_dim,
    window row 0 penalty) and s2-pro (fish_qwen3_omni, sharded safetensors,
    HF tokenizer, semantic-only slow token, top-k, RAS) layouts load with no
    flags and match golden fixtures made with the original code at the
    pinned commits (fixtures/fish_lm/make_fixture.py): prefill log-probs and
    40 greedy frames for a plain and a reference-code prompt."""
    import hashlib

    import make_fish_checkpoint as mk

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    fx = torch.load(FIXTURES / f"fish_{kind}.pt", weights_only=True)
    path = tmp_path / kind
    getattr(mk, f"make_{kind}")(path, 0, torch.float32)
    for name, digest in fx["weights"].items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == digest, (
            "make_fish_checkpoint.py changed: re-run fixtures/fish_lm/make_fixture.py"
        )
    if kind == "v15":
        params = SamplingParams(
            temperature=0,
            repetition_penalty=RP,
            max_tokens=STEPS,
            detokenize=False,
            logprobs=20,
        )
    else:  # top-k 1 also pins the original's repetition-aware resampling
        params = SamplingParams(
            temperature=0.7,
            top_p=0.9,
            top_k=1,
            seed=0,
            max_tokens=STEPS,
            detokenize=False,
            logprobs=20,
        )
    prompts, plist = [], []
    for values in fx["prompts"]:
        ids, rows = _vllm_prompt(values)
        prompts.append(TokensPrompt(prompt_token_ids=ids))
        p = params.clone()
        p.extra_args = {"prompt_aux_codes": rows} if rows else None
        plist.append(p)
    assert plist[1].extra_args is not None
    llm = LLM(
        model=str(path),
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        max_logprobs=20,
        kv_cache_memory_bytes=32 << 20,
    )
    try:
        outs = llm.generate(prompts, plist, use_tqdm=False)
        cfg = llm.llm_engine.vllm_config.model_config.hf_config
    finally:
        del llm
    for out, logits, frames in zip(outs, fx["logits"], fx["frames"]):
        o = out.outputs[0]
        lp = o.logprobs[0]
        got_ids = list(lp)
        if kind == "s2":
            # S2's default head computes only the semantic slice + im_end
            # (what its sampler allows): log-probs over that set
            allowed = torch.zeros_like(logits, dtype=torch.bool)
            allowed[cfg.semantic_begin_id : cfg.semantic_end_id + 1] = True
            allowed[cfg.im_end_id] = True
            logits = logits.masked_fill(~allowed, float("-inf"))
        want = torch.log_softmax(logits, -1)
        # first entry: the sampled token (S2: the best *semantic* one; the
        # log-probs are of the raw logits), then the top 20
        torch.testing.assert_close(
            torch.tensor([lp[i].logprob for i in got_ids]),
            want[got_ids],
            rtol=1e-3,
            atol=1e-4,
        )
        n = frames.shape[1]
        assert n == STEPS
        assert list(o.token_ids) == frames[0].tolist()
        assert o.aux_token_ids.tolist() == frames[2:].T.tolist()
