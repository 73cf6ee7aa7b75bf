# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""CosyVoice2 / CosyVoice3 end to end: vLLM vs the original PyTorch pipeline.

``--model cosyvoice2`` (default): vLLM's ``CosyVoice2ForCausalLM`` + the
flow/HiFT decoder against cosyvoice-minicpmo (``Qwen2LM`` on HF transformers
+ ``CosyVoice2Model`` token2wav). ``--model cosyvoice3``: vLLM's
``CosyVoice3ForCausalLM`` + ``CosyVoice3Token2Wav`` (DiT flow, causal HiFT)
against the original ``CosyVoice3LM`` + ``CosyVoice3Model`` of a CosyVoice
checkout given with ``--original-src`` (no PyPI package has them), built
from the release directory's ``cosyvoice3.yaml`` and loaded with
``CosyVoice3Model.load`` as ``CosyVoice3(model_dir)`` does (its text
frontend aside). Random weights at the release size (``--tiny``: tiny dims),
release directory made at run time by ``tools/make_cosyvoice{2,3}_checkpoint.py``.

For each concurrency level (default 1, 4, 16), two passes per system:

* ``lm``: the LM alone, aggregate speech tokens/s;
* ``tts``: text -> streamed audio; time to first audio (first non-empty
  chunk), request latency, and RTF = latency / audio seconds (mean over
  requests; ``rtf_aggregate`` = wall / total audio seconds).

Every request generates ``--tokens`` speech tokens in both systems (min =
max length; CosyVoice3 can still end early on a stop id other than sos, as
its original does), with the zero-shot speaker ``spk_a`` of the directory's
``spk2info.pt``, so the work is the same. vLLM side: an in-process
``AsyncLLM`` and the API server's own decode worker (``DecodeWorker``, one
thread; streaming sessions served in rounds of one batched chunk each),
fed as ``/v1/audio/speech`` feeds them (the decoder's
``stream_chunk_frames``); each level reports the rounds and the chunks per
round. The decoder's fp32 matmuls follow ``VLLM_FLOAT32_MATMUL_PRECISION``
as the server's do (``high``: TF32). Original side: one shared
model object called from ``c`` threads (``tts(stream=True)``, its LLM in a
thread per request, as its servers do); the ``lm`` pass runs its
``llm_job``. CosyVoice3's original keeps the growing stream hop (25 -> 50 ->
100) on the shared model object, so only its first request ever starts at
25; here each request starts at 25, as each vLLM session does
(``--ref-shared-hop``: the original's literal behaviour).

Results: a line per level as it finishes, the JSON at the end (and in
``--out`` after every level). ``--budget-s`` (default 540 s on a GPU) skips a
level whose time, extrapolated from the level before, would not fit.

    python benchmarks/bench_cosyvoice2.py --out results/cosyvoice2-h100.json
    python benchmarks/bench_cosyvoice2.py --tiny          # CPU smoke run
    python benchmarks/bench_cosyvoice2.py --model cosyvoice3 \\
        --original-src <CosyVoice checkout> [--original-deps DIR] [--tiny]

CosyVoice2 needs ``cosyvoice-minicpmo`` (+ its flow deps: see
tools/requirements-test.txt) importable. CosyVoice3 imports ``cosyvoice``
from ``--original-src`` (a directory holding the ``cosyvoice`` package of
FunAudioLLM/CosyVoice, e.g. at ace7c47f), ``matcha`` (the
cosyvoice-minicpmo copy of Matcha-TTS; its ``matcha.utils`` is shimmed to a
logger factory) and x-transformers (only ``RotaryEmbedding`` and
``apply_rotary_pos_emb``; the package ``__init__`` is bypassed and einx is
stubbed when missing). Modules not installed are looked up in the wheels or
directories of ``--original-deps`` (default ``<repo>/.whl``; pure-Python
wheels import as zips). Run from outside the repository root (or with
PYTHONSAFEPATH=1) so that the repository's ``vllm/`` does not shadow the
installed package.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import importlib
import importlib.util
import json
import logging
import operator
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import types
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from make_cosyvoice2_checkpoint import install_matcha_logger_shim  # noqa: E402

TEXTS = {
    "cosyvoice2": (
        "Hello, this is a benchmark of CosyVoice two running inside vLLM, "
        "compared with the original implementation."
    ),
    "cosyvoice3": (
        "Hello, this is a benchmark of CosyVoice three running inside vLLM, "
        "compared with the original implementation."
    ),
}
RELEASE_NAMES = {"cosyvoice2": "CosyVoice2-0.5B", "cosyvoice3": "Fun-CosyVoice3-0.5B"}
# the same 25 Hz tokens -> 24 kHz audio in both generations
TOKEN_RATE = 25


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _summary(reqs: list[dict], wall: float, sr: int) -> dict:
    audio_s = sum(r["samples"] for r in reqs) / sr
    tokens = sum(r["tokens"] for r in reqs)
    out = {
        "requests": len(reqs),
        "wall_s": round(wall, 4),
        "tokens_per_s": round(tokens / wall, 2),
        "audio_s": round(audio_s, 3),
    }
    if reqs and "ttfa" in reqs[0]:
        ttfa = [r["ttfa"] for r in reqs]
        lat = [r["latency"] for r in reqs]
        rtf = [r["latency"] / max(r["samples"] / sr, 1e-9) for r in reqs]
        out.update(
            ttfa_mean_s=round(statistics.mean(ttfa), 4),
            ttfa_p50_s=round(statistics.median(ttfa), 4),
            ttfa_max_s=round(max(ttfa), 4),
            latency_mean_s=round(statistics.mean(lat), 4),
            rtf_mean=round(statistics.mean(rtf), 4),
            rtf_aggregate=round(wall / max(audio_s, 1e-9), 4),
        )
    return out


def _sizes(sizes: list[int]) -> dict:
    """Calls and their mean / largest batch."""
    return {
        "calls": len(sizes),
        "mean_batch": round(statistics.mean(sizes), 2) if sizes else 0,
        "max_batch": max(sizes, default=0),
    }


def _trace_token2wav_batch(t2w: Any) -> list[int]:
    """Sizes of the token2wav_batch calls (decoded chunks per round)."""
    sizes: list[int] = []
    inner = t2w.token2wav_batch

    def traced(jobs):
        sizes.append(len(jobs))
        return inner(jobs)

    t2w.token2wav_batch = traced
    return sizes


def _n_requests(args, c: int) -> int:
    return max(c, args.requests if c == 1 else c * args.rounds)


class Budget:
    """Wall-clock budget of the whole run. A pass is skipped when the same
    pass of the level before, scaled to this level's tokens (x 1.3), says
    it would not fit; the lm pass of a level also gives way when only its
    tts pass fits."""

    SAFETY = 1.3

    def __init__(self, seconds: float):
        self.t0 = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        if self.seconds <= 0:
            return float("inf")
        return self.seconds - (time.monotonic() - self.t0)

    def need(self, prev: dict | None, tokens: int) -> float:
        if not prev or not prev.get("tokens_per_s"):
            return 0.0  # unknown: the first level always runs
        return self.SAFETY * tokens / prev["tokens_per_s"]


def _run_levels(sysname, args, budget, res, run_level, reserve=0.0, dump=None):
    """The lm and tts passes of every level (``run_level(part, c)`` returns
    the summary), skipping what the budget cannot hold."""
    levels = [int(c) for c in args.concurrency.split(",")]
    parts = [p for p in ("lm", "tts") if p in args.passes.split(",")]
    prev: dict[str, dict | None] = {p: None for p in parts}
    for c in levels:
        if sysname == "original" and c > args.ref_max_concurrency:
            continue
        tokens = _n_requests(args, c) * args.tokens
        line = {}
        for part in parts:
            left = budget.left() - reserve
            need = budget.need(prev[part], tokens)
            later = 0.0
            if part == "lm" and "tts" in parts:
                later = budget.need(prev["tts"], tokens)
            if left <= 0:
                out = {"skipped": f"time budget spent ({budget.seconds:.0f} s)"}
            elif need > left:
                out = {"skipped": f"about {need:.0f} s needed, {left:.0f} s left"}
            elif need + later > left and later <= left:
                out = {
                    "skipped": f"about {need:.0f} s needed; the tts pass "
                    f"(about {later:.0f} s) goes first, {left:.0f} s left"
                }
            else:
                out = prev[part] = run_level(part, c)
            res[part][str(c)] = line[part] = out
        print(sysname, c, json.dumps(line), flush=True)
        if dump is not None:
            dump()


# ---------------------------------------------------------------- vLLM ----
def _vllm_class(model: str):
    if model == "cosyvoice3":
        from vllm.model_executor.models.cosyvoice3 import CosyVoice3ForCausalLM

        return CosyVoice3ForCausalLM
    from vllm.model_executor.models.cosyvoice2 import CosyVoice2ForCausalLM

    return CosyVoice2ForCausalLM


async def _vllm_run(args, model_dir: Path, budget: Budget, dump) -> dict:
    from vllm.config.text_to_speech import TextToSpeechParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.text_to_speech.serving import DecodeWorker
    from vllm.v1.engine.async_llm import AsyncLLM

    M = _vllm_class(args.model)
    levels = [int(c) for c in args.concurrency.split(",")]
    kw: dict = dict(
        model=str(model_dir),
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=max(levels),
        enable_log_requests=False,
    )
    if torch.cuda.is_available():
        kw.update(
            gpu_memory_utilization=args.gpu_memory_utilization,
            compilation_config={
                "cudagraph_capture_sizes": sorted({1, 2, 4, 8, 16, *levels})
            },
        )
        if args.enforce_eager:
            kw.update(enforce_eager=True)
    else:
        kw.update(enforce_eager=True, kv_cache_memory_bytes=256 << 20)
    t0 = time.monotonic()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))
    ready_s = time.monotonic() - t0
    mc = engine.model_config
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    decoder = M.get_speech_decoder(mc, dev)
    worker = DecodeWorker(decoder)
    first_chunk, next_chunk = getattr(decoder, "stream_chunk_frames", (8, 32))
    sr = decoder.sample_rate

    params = TextToSpeechParams(text=args.text, model_config=mc, speaker="spk_a")
    prompt = M.get_speech_generation_prompt(params)
    voice = params.voice
    sp = M.get_speech_sampling_params(
        params,
        {"temperature": 1.0, "top_p": 0.8, "top_k": 25, "max_tokens": args.tokens},
    )
    sp.min_tokens = sp.max_tokens = args.tokens
    counter = [0]
    # as /v1/audio/speech: DecodeWorker.stream (sessions served in rounds,
    # one batched decode_streams call per round)
    rounds: list[int] = []
    inner = decoder.decode_streams

    def traced(sessions, frames):
        rounds.append(len(sessions))
        return inner(sessions, frames)

    decoder.decode_streams = traced
    chunk_sizes = _trace_token2wav_batch(decoder.t2w)

    async def lm_only() -> dict:
        counter[0] += 1
        out = None
        async for out in engine.generate(prompt, sp, f"lm-{counter[0]}"):
            pass
        return {"tokens": len(out.outputs[0].token_ids), "samples": 0}

    async def tts() -> dict:
        counter[0] += 1
        t = time.monotonic()
        session = await worker.call(lambda: decoder.open_stream(voice))
        sent, samples, ttfa, n = 0, 0, None, 0
        async for out in engine.generate(prompt, sp, f"tts-{counter[0]}"):
            frames = M.get_speech_frames(out.outputs[0], mc)
            n = len(frames)
            need = first_chunk if sent == 0 else next_chunk
            if n - sent >= need or (out.finished and n > sent):
                new, sent = frames[sent:], n
                async for audio in worker.stream(session, new):
                    if audio.size and ttfa is None:
                        ttfa = time.monotonic() - t
                    samples += audio.size
        async for audio in worker.stream(session, None):
            samples += audio.size
        if ttfa is None:
            ttfa = time.monotonic() - t
        return {
            "tokens": n,
            "samples": samples,
            "ttfa": ttfa,
            "latency": time.monotonic() - t,
        }

    async def level(fn, c: int) -> dict:
        sem = asyncio.Semaphore(c)

        async def one():
            async with sem:
                return await fn()

        del rounds[:], chunk_sizes[:]
        t = time.monotonic()
        reqs = await asyncio.gather(*[one() for _ in range(_n_requests(args, c))])
        out = _summary(list(reqs), time.monotonic() - t, sr)
        if rounds:
            out["decode_rounds"] = _sizes(rounds)
            out["decoded_chunks"] = _sizes(chunk_sizes)
        return out

    # warm-up with the timed sampling parameters
    t0 = time.monotonic()
    await asyncio.gather(*[tts() for _ in range(min(2, max(levels)))])
    res: dict = {
        "engine_ready_s": round(ready_s, 2),
        "warmup_s": round(time.monotonic() - t0, 2),
        "stream_decode": "DecodeWorker.stream rounds (decode_streams)",
        "lm": {},
        "tts": {},
    }
    dump.results["vllm"] = res
    print(
        "vllm ready",
        json.dumps(
            {k: res[k] for k in ("engine_ready_s", "warmup_s", "stream_decode")}
        ),
        flush=True,
    )
    # _run_levels is synchronous (shared with the original's threads): it
    # runs in a worker thread and hands each level to this loop.
    loop = asyncio.get_running_loop()

    def sync_level(part: str, c: int) -> dict:
        fn = lm_only if part == "lm" else tts
        return asyncio.run_coroutine_threadsafe(level(fn, c), loop).result()

    reserve = 0.0 if args.skip_original else args.ref_reserve_s
    await asyncio.to_thread(
        _run_levels, "vllm", args, budget, res, sync_level, reserve, dump
    )
    engine.shutdown()
    return res


# ------------------------------------------------------------ original ----
def _no_cuda_autocast_warning() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*torch.cuda.amp.autocast.*")


def _drop_all_ones_decode_mask(hf_model: Any) -> None:
    """transformers >= 5 reads the [1, L] all-ones mask of
    ``Qwen2Encoder.forward_one_step`` as "last key only"; drop it as the
    transformers the original pins (4.51) did."""
    orig_forward = hf_model.forward

    def forward(*a, attention_mask=None, **k):
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        return orig_forward(*a, attention_mask=attention_mask, **k)

    hf_model.forward = forward


def _original_cv2(args, model_dir: Path, dev: torch.device) -> dict:
    install_matcha_logger_shim()
    from cosyvoice.cli.model import CosyVoice2Model
    from cosyvoice.llm.llm import Qwen2Encoder, Qwen2LM
    from cosyvoice.utils.common import ras_sampling
    from make_cosyvoice2_checkpoint import REAL, TINY, _flow_hift

    from vllm.transformers_utils.cosyvoice2 import cosyvoice2_config_dict

    conf = cosyvoice2_config_dict(model_dir)
    h, s = conf["hidden_size"], conf["cosyvoice_speech_token_size"]
    lm = Qwen2LM(
        h,
        h,
        s,
        Qwen2Encoder(str(model_dir / "CosyVoice-BlankEN")),
        sampling=partial(ras_sampling, top_p=0.8, top_k=25, win_size=10, tau_r=0.1),
    )
    lm.load_state_dict(torch.load(model_dir / "llm.pt", weights_only=True), strict=True)
    _drop_all_ones_decode_mask(lm.llm.model)
    lm = lm.to(dev).eval()
    # same flow/HiFT weights as the release dir (the maker is deterministic)
    flow, hift = _flow_hift(TINY if args.tiny else REAL, args.seed)
    flow.load_state_dict(torch.load(model_dir / "flow.pt", weights_only=True))
    hift.load_state_dict(torch.load(model_dir / "hift.pt", weights_only=True))
    model = CosyVoice2Model(
        lm, flow.to(dev).eval(), hift.to(dev).eval(), fp16=args.ref_fp16
    )
    model.llm = lm  # cosyvoice-minicpmo's __init__ leaves it out
    return {"model": model, "lm": lm}


def _find_dep(name: str, deps: list[Path]) -> bool:
    """Make ``name`` importable: installed, or from a wheel / directory of
    ``deps`` (appended to sys.path, so installed packages win)."""
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return True
    for d in deps:
        cands = sorted(d.glob("*.whl")) if d.is_dir() else [d]
        if d.is_dir():
            cands.append(d)
        for c in cands:
            if str(c) in sys.path:
                continue
            sys.path.append(str(c))
            importlib.invalidate_caches()
            if importlib.util.find_spec(name) is not None:
                return True
            sys.path.remove(str(c))
    return False


def _stub(name: str, package: bool = False, **attrs: Any) -> types.ModuleType:
    """A stand-in module with a spec (``importlib.util.find_spec`` raises
    on a module in sys.modules without one)."""
    import importlib.machinery

    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        mod.__path__ = []  # type: ignore[attr-defined]
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _stub_torchaudio() -> None:
    """torchaudio is imported at module level by cosyvoice's DiT modules,
    file_utils and onnx helpers but not used by inference; a stand-in that
    fails on use when it is not installed."""

    def missing(*a, **k):
        raise RuntimeError("torchaudio is not installed (benchmark stub)")

    ta = _stub("torchaudio", package=True, load=missing)
    comp = _stub("torchaudio.compliance", package=True)
    kaldi = _stub("torchaudio.compliance.kaldi", fbank=missing)
    tr = _stub(
        "torchaudio.transforms",
        MelSpectrogram=missing,
        Resample=missing,
        Spectrogram=missing,
    )
    ta.compliance, comp.kaldi, ta.transforms = comp, kaldi, tr


_CV3_MODULES = (
    "cosyvoice.cli.model",
    "cosyvoice.llm.llm",
    "cosyvoice.utils.common",
    "cosyvoice.flow.flow",
    "cosyvoice.flow.flow_matching",
    "cosyvoice.flow.DiT.dit",
    "cosyvoice.transformer.upsample_encoder",
    "cosyvoice.hifigan.generator",
    "cosyvoice.hifigan.f0_predictor",
)


def import_original_cv3(src: Path, deps: list[Path]) -> dict:
    """The original CosyVoice3 classes from the checkout ``src`` (its
    ``cosyvoice`` package first on sys.path, any other ``cosyvoice``
    unloaded). Returns notes on what was shimmed."""
    if not (src / "cosyvoice" / "llm" / "llm.py").is_file():
        raise FileNotFoundError(f"{src} holds no cosyvoice/llm/llm.py")
    notes: dict[str, str] = {}
    missing = [
        n
        for n in (
            "transformers",
            "scipy",
            "omegaconf",
            "onnxruntime",
            "einops",
            "conformer",
            "diffusers",
            "yaml",
            "matcha",
            "x_transformers",
        )
        if not _find_dep(n, deps)
    ]
    if missing:
        raise ModuleNotFoundError(
            f"the original CosyVoice3 needs {missing} (matcha: the "
            "cosyvoice-minicpmo==0.1.0 wheel; x_transformers: "
            "x-transformers==2.11.24), neither installed nor in "
            f"{[str(d) for d in deps]}"
        )
    for name in ("einx", "loguru"):
        if not _find_dep(name, deps):
            if name == "loguru":
                _stub("loguru", logger=logging.getLogger("loguru"))
            else:
                _stub("einx")
            notes[name] = "stubbed (imported, unused by the modules used)"
    # x_transformers/__init__ imports every wrapper of the package; the DiT
    # needs x_transformers.x_transformers only.
    if "x_transformers" not in sys.modules:
        spec = importlib.util.find_spec("x_transformers")
        pkg = _stub("x_transformers", package=True)
        pkg.__path__ = list(spec.submodule_search_locations)  # type: ignore
        notes["x_transformers"] = f"package __init__ bypassed ({pkg.__path__[0]})"
    install_matcha_logger_shim()
    import transformers  # noqa: F401  (before any torchaudio stand-in)

    for name in list(sys.modules):
        if name == "cosyvoice" or name.startswith("cosyvoice."):
            del sys.modules[name]
    sys.path.insert(0, str(src))
    importlib.invalidate_caches()
    no_torchaudio = not _find_dep("torchaudio", deps)
    if no_torchaudio:
        _stub_torchaudio()
    import cosyvoice

    got = Path(cosyvoice.__file__).resolve()
    if not got.is_relative_to(src.resolve()):
        raise ImportError(f"cosyvoice resolved to {got}, not under {src}")
    # the modules of CosyVoice3Model and of cosyvoice3.yaml's classes
    for mod in _CV3_MODULES:
        importlib.import_module(mod)
    if no_torchaudio:
        # They keep their reference; nobody else (transformers checks
        # find_spec("torchaudio")) should see the stand-in.
        for name in [n for n in sys.modules if n.split(".")[0] == "torchaudio"]:
            del sys.modules[name]
        notes["torchaudio"] = "not installed: a stand-in while cosyvoice imports"
    commit = src / "COMMIT"
    notes["cosyvoice"] = str(src) + (
        f" @ {commit.read_text().strip()}" if commit.is_file() else ""
    )
    return notes


# A small reader for the release's hyperpyyaml (the original loads it with
# HyperPyYAML, which the GPU image lacks): !new: / !name: / !apply: / !ref
# with the arithmetic hyperpyyaml allows, sections built on demand.
class _Tag:
    def __init__(self, kind: str, target: str, args: Any):
        self.kind, self.target, self.args = kind, target, args


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
}


def _read_hyperpyyaml(text: str) -> dict:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def tagged(kind):
        def construct(loader, suffix, node):
            if isinstance(node, yaml.MappingNode):
                args = loader.construct_mapping(node, deep=True)
            elif isinstance(node, yaml.SequenceNode):
                args = loader.construct_sequence(node, deep=True)
            else:
                args = loader.construct_scalar(node) or None
            return _Tag(kind, suffix, args)

        return construct

    for kind in ("new", "name", "apply"):
        Loader.add_multi_constructor(f"!{kind}:", tagged(kind))
    Loader.add_constructor(
        "!ref", lambda loader, node: _Tag("ref", loader.construct_scalar(node), None)
    )
    return yaml.load(text, Loader=Loader)  # noqa: S506 (our own loader)


def _arith(expr: str) -> Any:
    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, int | float):
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in _OPS:
            return _OPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        raise ValueError(f"unsupported !ref expression {expr!r}")

    return ev(ast.parse(expr, mode="eval"))


class _HyperYaml:
    def __init__(self, text: str, overrides: dict | None = None):
        self.raw = _read_hyperpyyaml(text)
        self.raw.update(overrides or {})
        self.built: dict[str, Any] = {}
        # the seed setters run first, in order, as hyperpyyaml runs them
        for k, v in self.raw.items():
            if isinstance(v, _Tag) and v.kind == "apply":
                self[k]

    def __getitem__(self, key: str) -> Any:
        if key not in self.built:
            self.built[key] = self._build(self.raw[key])
        return self.built[key]

    @staticmethod
    def _obj(path: str) -> Any:
        mod, _, name = path.rpartition(".")
        return getattr(importlib.import_module(mod), name)

    def _build(self, node: Any) -> Any:
        if isinstance(node, dict):
            return {k: self._build(v) for k, v in node.items()}
        if isinstance(node, list):
            return [self._build(v) for v in node]
        if isinstance(node, str) and _NUMBER.fullmatch(node):
            return float(node) if any(c in node for c in ".eE") else int(node)
        if not isinstance(node, _Tag):
            return node
        if node.kind == "ref":
            whole = re.fullmatch(r"\s*<([^<>]+)>\s*", node.target)
            if whole:
                return self[whole.group(1)]
            return _arith(
                re.sub(r"<([^<>]+)>", lambda m: repr(self[m.group(1)]), node.target)
            )
        fn = self._obj(node.target)
        args = self._build(node.args)
        if node.kind == "name":
            return partial(fn, **(args or {}))
        if isinstance(args, dict):
            return fn(**args)
        return fn(*(args or []))


def _original_cv3(args, model_dir: Path, dev: torch.device) -> dict:
    notes = import_original_cv3(Path(args.original_src), args.original_deps)
    from cosyvoice.cli.model import CosyVoice3Model

    class Model(CosyVoice3Model):
        """``CosyVoice3Model`` with its stream hop per calling thread (see
        the module docstring); ``--ref-shared-hop`` uses the class as is."""

        _hop = threading.local()

        @property
        def token_hop_len(self):
            return getattr(self._hop, "v", self.__dict__["_hop0"])

        @token_hop_len.setter
        def token_hop_len(self, v):
            self.__dict__.setdefault("_hop0", v)
            self._hop.v = v

    conf = _HyperYaml(
        (model_dir / "cosyvoice3.yaml").read_text(encoding="utf-8"),
        {"qwen_pretrain_path": str(model_dir / "CosyVoice-BlankEN")},
    )
    # CosyVoice3(model_dir): llm, flow, hift from the yaml, then
    # CosyVoice3Model.load (strict) of llm.pt / flow.pt / hift.pt. The
    # original pins transformers 4.51, whose from_pretrained loads fp32.
    llm, flow, hift = conf["llm"].float(), conf["flow"], conf["hift"]
    cls = CosyVoice3Model if args.ref_shared_hop else Model
    model = cls(llm, flow, hift, fp16=args.ref_fp16)
    model.load(
        str(model_dir / "llm.pt"),
        str(model_dir / "flow.pt"),
        str(model_dir / "hift.pt"),
    )
    _drop_all_ones_decode_mask(model.llm.llm.model)
    return {
        "model": model,
        "lm": model.llm,
        "notes": notes,
        "per_request_hop": not args.ref_shared_hop,
    }


def _original_run(args, model_dir: Path, budget: Budget, dump) -> dict:
    from vllm.model_executor.models.cosyvoice2 import (
        _freeze,
        get_cosyvoice2_tokenizer,
    )

    _no_cuda_autocast_warning()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.monotonic()
    built = (_original_cv3 if args.model == "cosyvoice3" else _original_cv2)(
        args, model_dir, dev
    )
    model, lm = built["model"], built["lm"]
    load_s = time.monotonic() - t0

    specials = _vllm_class(args.model).special_tokens
    text_ids = get_cosyvoice2_tokenizer(
        str(model_dir / "CosyVoice-BlankEN"), _freeze(specials)
    ).encode(args.text)
    # min_len = max_len = --tokens (int(len(text) * ratio))
    ratio = (args.tokens + 0.5) / len(text_ids)
    inference = partial(
        lm.inference, min_token_text_ratio=ratio, max_token_text_ratio=ratio
    )
    raw_tokens: dict[str, int] = {}

    def counting_inference(**kw):
        n = 0
        for tok in inference(**kw):
            n += 1
            yield tok
        raw_tokens[kw.get("uuid", "")] = n

    lm.inference = counting_inference
    spk = torch.load(model_dir / "spk2info.pt", weights_only=True)["spk_a"]
    text = torch.tensor([text_ids], dtype=torch.int32)
    sr = 24000
    samples_per_token = sr // TOKEN_RATE

    def lm_only() -> dict:
        """The original's own LLM thread body (``llm_job``: its CUDA stream,
        fp16 autocast when fp16=True, silent-token filter)."""
        uid = str(uuid.uuid1())
        with model.lock:
            model.tts_speech_token_dict[uid], model.llm_end_dict[uid] = [], False
        model.llm_job(
            text,
            spk["prompt_text"],
            spk["llm_prompt_speech_token"],
            spk["llm_embedding"],
            uid,
        )
        _sync()
        with model.lock:
            model.tts_speech_token_dict.pop(uid)
            model.llm_end_dict.pop(uid)
        return {"tokens": raw_tokens.pop(uid), "samples": 0}

    def tts() -> dict:
        if built.get("per_request_hop"):
            model.token_hop_len = model.__dict__["_hop0"]
        t = time.monotonic()
        ttfa, samples = None, 0
        with torch.inference_mode():
            for out in model.tts(
                text=text,
                flow_embedding=spk["flow_embedding"],
                llm_embedding=spk["llm_embedding"],
                prompt_text=spk["prompt_text"],
                llm_prompt_speech_token=spk["llm_prompt_speech_token"],
                flow_prompt_speech_token=spk["flow_prompt_speech_token"],
                prompt_speech_feat=spk["prompt_speech_feat"],
                stream=True,
            ):
                _sync()
                if ttfa is None:
                    ttfa = time.monotonic() - t
                samples += out["tts_speech"].numel()
        return {
            # tokens that reached token2wav (after the silent-token filter)
            "tokens": round(samples / samples_per_token),
            "samples": samples,
            "ttfa": ttfa,
            "latency": time.monotonic() - t,
        }

    def level(fn, c: int) -> dict:
        results: list[dict] = []
        lock = threading.Lock()
        todo = list(range(_n_requests(args, c)))

        def run():
            while True:
                with lock:
                    if not todo:
                        return
                    todo.pop()
                r = fn()
                with lock:
                    results.append(r)

        t = time.monotonic()
        threads = [threading.Thread(target=run) for _ in range(c)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return _summary(results, time.monotonic() - t, sr)

    t1 = time.monotonic()
    tts()  # warm-up
    res: dict = {
        "load_s": round(load_s, 2),
        "warmup_s": round(time.monotonic() - t1, 2),
        "lm": {},
        "tts": {},
    }
    for k in ("notes", "per_request_hop"):
        if k in built:
            res[k] = built[k]
    dump.results["original"] = res
    print(
        "original ready",
        json.dumps({k: v for k, v in res.items() if k not in ("lm", "tts")}),
        flush=True,
    )
    _run_levels(
        "original",
        args,
        budget,
        res,
        lambda part, c: level(lm_only if part == "lm" else tts, c),
        0.0,
        dump,
    )
    return res


# ---------------------------------------------------------------- main ----
def _ratios(results: dict) -> dict:
    out: dict = {}
    for part in ("lm", "tts"):
        for c, ours in results.get("vllm", {}).get(part, {}).items():
            ref = results.get("original", {}).get(part, {}).get(c)
            key = "tokens_per_s" if part == "lm" else "rtf_aggregate"
            if not ref or key not in ref or key not in ours:
                continue
            out[f"{part}_c{c}_{key}"] = round(
                (ours[key] / ref[key]) if part == "lm" else (ref[key] / ours[key]), 2
            )
            if part == "tts":
                out[f"tts_c{c}_ttfa_mean"] = round(
                    ref["ttfa_mean_s"] / ours["ttfa_mean_s"], 2
                )
    return out


class _Dump:
    def __init__(self, results: dict, path: str | None):
        self.results, self.path = results, path

    def __call__(self) -> None:
        self.results.pop("ratios_vllm_over_original", None)
        self.results["ratios_vllm_over_original"] = _ratios(self.results)
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.path).write_text(json.dumps(self.results, indent=2) + "\n")


def _failed(results: dict, name: str, e: BaseException) -> None:
    import traceback

    traceback.print_exc()
    results.setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"
    print(name, "failed:", e, flush=True)


def _make_release_dir(args, out: Path) -> Path:
    size = "tiny" if args.tiny else "real"
    if args.model == "cosyvoice3":
        from make_cosyvoice3_checkpoint import make_release_dir
    else:
        from make_cosyvoice2_checkpoint import make_release_dir
    return make_release_dir(out, size, args.seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(TEXTS), default="cosyvoice2")
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="tiny random dims (CPU smoke run) instead of the 0.5B release's",
    )
    ap.add_argument("--model-dir", help="existing release dir (default: make one)")
    ap.add_argument(
        "--workdir",
        help="where to make the release dir (default: the system temp dir; "
        "e.g. /dev/shm to spare the disk)",
    )
    ap.add_argument(
        "--original-src",
        type=Path,
        help="CosyVoice3: directory holding the original `cosyvoice` package "
        "(FunAudioLLM/CosyVoice checkout)",
    )
    ap.add_argument(
        "--original-deps",
        type=Path,
        action="append",
        default=None,
        help="wheels or directories to import the original's missing "
        "dependencies from (repeatable; default <repo>/.whl)",
    )
    ap.add_argument("--concurrency", default=None, help="default 1,4,16 (tiny: 1,4)")
    ap.add_argument("--passes", default="lm,tts", help="lm,tts or one of them")
    ap.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="speech tokens per request (default 250 = 10 s; tiny 30)",
    )
    ap.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests at concurrency 1 (default 5; tiny 2)",
    )
    ap.add_argument(
        "--rounds", type=int, default=2, help="requests per slot at concurrency > 1"
    )
    ap.add_argument(
        "--dtype", default=None, help="vLLM dtype (default bfloat16 on GPU)"
    )
    ap.add_argument(
        "--enforce-eager", action="store_true", help="vLLM without CUDA graphs"
    )
    ap.add_argument(
        "--ref-fp16",
        action="store_true",
        help="the original's fp16=True mode (fp16 autocast of its LLM job and "
        "token2wav; CosyVoice2: flow.half() too)",
    )
    ap.add_argument(
        "--ref-shared-hop",
        action="store_true",
        help="CosyVoice3: keep the original's stream hop on the shared model "
        "object (only its first request streams from hop 25)",
    )
    ap.add_argument("--ref-max-concurrency", type=int, default=16)
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-clock budget of the run; levels that would not fit are "
        "skipped (default 540 on a GPU, none on CPU; 0 = none)",
    )
    ap.add_argument(
        "--ref-reserve-s",
        type=float,
        default=None,
        help="budget kept for the original while vLLM runs (default 240 on a "
        "GPU, 0 on CPU)",
    )
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--text", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-original", action="store_true")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    budget = Budget(
        args.budget_s if args.budget_s is not None else (540.0 if cuda else 0.0)
    )
    if args.model == "cosyvoice3" and not (args.skip_original or args.original_src):
        ap.error("--model cosyvoice3 needs --original-src (or --skip-original)")
    args.original_deps = args.original_deps or [REPO / ".whl"]
    args.concurrency = args.concurrency or ("1,4" if args.tiny else "1,4,16")
    args.tokens = args.tokens or (30 if args.tiny else 250)
    args.requests = args.requests or (2 if args.tiny else 5)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.text = args.text or TEXTS[args.model]
    if args.ref_reserve_s is None:
        args.ref_reserve_s = 240.0 if cuda else 0.0
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")

    results: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "model": args.model,
        "size": "tiny" if args.tiny else f"{RELEASE_NAMES[args.model]} dims (random)",
        "command": " ".join(sys.argv),
        "tokens_per_request": args.tokens,
        "budget_s": budget.seconds or None,
        "vllm_dtype": args.dtype,
        "original_dtype": (
            "fp16=True (fp16 autocast of the LLM job and token2wav"
            + (", flow.half()" if args.model == "cosyvoice2" else "")
            + ")"
            if args.ref_fp16
            else "fp32"
        ),
        "text": args.text,
    }
    dump = _Dump(results, args.out)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t0 = time.monotonic()
        model_dir = (
            Path(args.model_dir)
            if args.model_dir
            else _make_release_dir(args, Path(tmp) / RELEASE_NAMES[args.model])
        )
        results["release_dir_s"] = round(time.monotonic() - t0, 2)
        print("release dir", model_dir, results["release_dir_s"], "s", flush=True)
        # a failure of one system still leaves the other's results
        if not args.skip_vllm:
            try:
                results["vllm"] = asyncio.run(_vllm_run(args, model_dir, budget, dump))
            except Exception as e:  # noqa: BLE001
                _failed(results, "vllm", e)
            dump()
        if not args.skip_original:
            try:
                results["original"] = _original_run(args, model_dir, budget, dump)
            except Exception as e:  # noqa: BLE001
                _failed(results, "original", e)
        results["total_s"] = round(time.monotonic() - budget.t0, 1)
        dump()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
