#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""FireRedASR-AED-L: vLLM's /v1/audio/transcriptions vs the original, same run.

Random weights at FireRedASR-AED-L size (Conformer encoder 16 x d_model 1280,
20 heads, d_inner 5120, kernel 33; Transformer decoder 16 x 1280; vocab 7832;
about 1.14 B parameters), written at run time in the ORIGINAL release layout
(``model.pth.tar`` fp32 package, ``cmvn.ark``, ``dict.txt``,
``train_bpe1000.model``) into a temporary directory, then, on one GPU:

* the original: PyPI ``fireredasr==0.0.2``, its own loader
  (``load_fireredasr_aed_model``) and its ``FireRedAsr("aed", ...)
  .transcribe(uttids, wav_paths, args)`` (kaldiio WAV reading, fbank + CMVN,
  encoder, ``batch_beam_search``) with ``use_gpu=1``, ``beam_size=1``
  (greedy), batch size = the concurrency level, batches in file order.
  0.0.2 has no half-precision switch: for ``bfloat16``/``float16`` the model is
  cast with ``.to(dtype)`` and a one-line wrapper casts the (fp32) features
  before its ``model.transcribe``; ``float32`` is the package as shipped
  (torch defaults: TF32 matmuls off). Default on a GPU: both, loaded once,
  float32 first.
* vLLM (this patch set): ``python -m vllm.entrypoints.openai.api_server`` on
  the same directory, ``c`` concurrent clients (``openai.AsyncOpenAI``, as
  users call it) posting 16-bit WAV files to ``/v1/audio/transcriptions``
  (``temperature=0``: greedy), each client sending its next file when the
  previous answer arrived.

Both systems get the same synthetic utterances (gliding tones with noise,
durations uniform in 5-15 s, 16 kHz mono PCM-16 WAV, a fresh file for every
request so that no cache sees one twice) and decode EXACTLY ``--tokens``
tokens per utterance: the ``<eos>`` row of the (tied) output projection is
zeroed in the checkpoint, so its logit is 0 while the maximum over the other
7831 random logits is positive -- neither system ever stops early -- and the
length is capped on both sides with the same number: ``decode_max_len=T`` in
the original, ``max_completion_tokens=T`` in the request (vLLM). The script
checks it: the original's hypotheses (warm-up) have T tokens, and vLLM's
``vllm:generation_tokens_total`` grows by T per request.

Reported per system and concurrency (default 1, 16, 64): RTFx = seconds of
audio transcribed / wall seconds, tokens/s, request latency (vLLM), the ratio
vLLM / original, and a roofline estimate (decoder bytes per step -- weights +
cross/self KV of the batch -- over HBM bandwidth, encoder FLOPs over peak
bf16 FLOP/s), device name, torch / vLLM / fireredasr versions, and the time of
every phase.

GPU machine (no network; vLLM staged in /tmp/devsite as ../shared/device/README.md
says; the original travels as wheels in ``.whl/``, an ignored folder, so the
call must carry it: ``carry: [".whl"]``), from the repository root:

    source /tmp/devenv.sh && python3 -m pip install -q --no-index --no-deps \
        --target /tmp/site .whl/fireredasr-0.0.2-*.whl .whl/kaldiio-*.whl \
        && export PYTHONPATH=/tmp/site:$PYTHONPATH \
        && python3 setup.py device-overlay --site /tmp/devsite && cd /tmp \
        && python3 $OLDPWD/benchmarks/bench_fireredasr.py \
        --out $OUT/fireredasr_aed_h200.json

(The original's wheels, made with ``pip download --no-deps --only-binary=:all:
--python-version 3.12 ... -d .whl fireredasr==0.0.2 kaldiio``:
fireredasr-0.0.2-py3-none-any.whl, kaldiio-2.18.1-py3-none-any.whl; torch,
numpy, sentencepiece, transformers and peft are in the GPU image,
kaldi_native_fbank and soundfile in the vLLM bundle; modelscope, imported by
``fireredasr.models.fireredasr`` for downloads only, is stubbed if absent.) The server log is
written next to ``--out`` (``*.server.log``); the JSON is rewritten after each
phase, so a run cut short still reports what it measured. Expected on an
H200: about 1 min to make the checkpoint, 1 min for the original, 2-3 min for
the vLLM server start and its levels.

CPU smoke run (tiny checkpoint of tools/make_fireredasr_checkpoint.py):

    cd /tmp && PYTHONSAFEPATH=1 /work/main/.venv/bin/python \
        /work/main/benchmarks/bench_fireredasr.py --tiny --out /tmp/ffr_tiny.json

Run from outside the repository root (or with PYTHONSAFEPATH=1) so that the
repository's ``vllm/`` overlay directory does not shadow the installed package.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import types
import urllib.request
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

SR = 16000
# FireRedASR-AED-L's ``args`` (reference doc B.2); odim 7832.
AED_L = dict(
    idim=80, n_layers_enc=16, n_layers_dec=16, n_head=20, d_model=1280,
    d_inner=5120, kernel_size=33, pe_maxlen=5000, residual_dropout=0.1,
    dropout_rate=0.1, sos_id=3, eos_id=4, pad_id=2, blank_id=0,
    input_length_max=60.0, output_length_max=250,
)
AED_L_ODIM = 7832
# Peak HBM bandwidth (bytes/s) and dense bf16 FLOP/s by device name fragment.
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}

T0 = time.monotonic()


def log(*msg) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s]", *msg, flush=True)


def _device_lookup(table: dict) -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in table.items() if k in name), None)


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


# ------------------------------------------------------- checkpoint ----
def _load_package(path: Path) -> dict:
    import argparse as ap

    # the package pickles an argparse.Namespace: allow-list that one class
    with torch.serialization.safe_globals([ap.Namespace]):
        return torch.load(path, map_location="cpu")


def _zero_eos(state: dict, eos_id: int) -> None:
    """<eos> logit := 0 (tied projection): greedy never picks it."""
    with torch.no_grad():
        for key in ("decoder.tgt_word_emb.weight", "decoder.tgt_word_prj.weight"):
            if key in state:
                state[key][eos_id].zero_()


def make_real_release(out: Path, seed: int) -> Path:
    """FireRedASR-AED-L dims, random weights, in the release layout.

    Built with the original's own class (``FireRedAsrAed.from_args``) and the
    helpers of tools/make_fireredasr_checkpoint.py; ``dict.txt`` has the real
    vocabulary size (specials, the English BPE pieces, then CJK characters).
    """
    import make_fireredasr_checkpoint as mfc
    from fireredasr.models.fireredasr_aed import FireRedAsrAed

    out.mkdir(parents=True, exist_ok=True)
    pieces = mfc._train_spm(out)  # writes train_bpe1000.model
    words = list(mfc.SPECIALS)
    seen = set(words)
    for p in pieces:
        if p not in seen:
            words.append(p)
            seen.add(p)
    cp = 0x4E00
    while len(words) < AED_L_ODIM:
        ch = chr(cp)
        cp += 1
        if ch not in seen:
            words.append(ch)
            seen.add(ch)
    with open(out / "dict.txt", "w", encoding="utf8") as f:
        f.writelines(f"{w} {i}\n" for i, w in enumerate(words))
    mfc.write_cmvn(out / "cmvn.ark", seed=seed)
    args = mfc.aed_args(AED_L_ODIM, **AED_L)
    torch.manual_seed(seed)
    model = FireRedAsrAed.from_args(args)
    # gain 3 as the tool's tiny checkpoints: with gain 1 the scaled input
    # embedding dominates and greedy copies <sos>; with 3 each utterance gets
    # its own tokens (residual |x| < ~200: safe in fp16 too)
    mfc._randomize(model, seed, gain=3.0)
    state = model.state_dict()
    _zero_eos(state, args.eos_id)
    torch.save({"args": args, "model_state_dict": state}, out / "model.pth.tar")
    return out


def make_tiny_release(out: Path, seed: int) -> Path:
    import make_fireredasr_checkpoint as mfc

    mfc.make_aed(out, seed=seed)
    pkg = _load_package(out / "model.pth.tar")
    _zero_eos(pkg["model_state_dict"], pkg["args"].eos_id)
    torch.save(pkg, out / "model.pth.tar")
    return out


# ------------------------------------------------------------ audio ----
def synth_utterance(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A gliding, amplitude-modulated tone plus noise, int16."""
    t = np.arange(int(SR * seconds)) / SR
    base = rng.uniform(150, 500)
    f = base + 120 * np.sin(2 * np.pi * rng.uniform(0.3, 1.2) * t)
    x = 0.3 * np.sin(2 * np.pi * np.cumsum(f) / SR)
    x *= 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.8, 2.0) * t)
    x += 0.02 * rng.standard_normal(t.size)
    return (np.clip(x, -1, 1) * 32767).astype(np.int16)


def make_utterances(out: Path, n: int, lo: float, hi: float, seed: int) -> list[dict]:
    import soundfile as sf

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    utts = []
    for i in range(n):
        sec = float(rng.uniform(lo, hi))
        x = synth_utterance(sec, rng)
        path = out / f"utt{i:04d}.wav"
        sf.write(path, x, SR, subtype="PCM_16")
        utts.append({"id": f"utt{i:04d}", "path": str(path),
                     "seconds": len(x) / SR})
    return utts


def plan_levels(levels: list[int], rounds: int, min_requests: int) -> dict:
    """Disjoint slices of one utterance list: a warm-up slice (c files) and
    a timed slice (max(c * rounds, min_requests) files) per level."""
    plan, i = {}, 0
    for c in levels:
        n = max(c * rounds, min_requests)
        plan[c] = {"warmup": (i, i + c), "timed": (i + c, i + c + n)}
        i += c + n
    return plan, i


# --------------------------------------------------------- roofline ----
def encoder_flops(a, frames: float) -> float:
    """FLOPs of the Conformer encoder on ``frames`` subsampled frames."""
    d, di, k, T = a.d_model, a.d_inner, a.kernel_size, frames
    per_frame = (
        2 * 2 * d * di      # ffn1 + ffn2 (two matmuls each)
        + 4 * d * d         # w_qs, w_ks, w_vs, fc
        + 6 * d * d         # pointwise_conv1 (d -> 4d), pointwise_conv2 (2d -> d)
        + 2 * d * k         # depthwise conv
    )
    layer = 2 * T * per_frame + 2 * (2 * T - 1) * d * d + 8 * T * T * d
    front = 2 * T * 608 * d + 2 * (4 * T) * 32 * 32 * 9 * 19
    return a.n_layers_enc * layer + front


def encoder_frames(seconds: float) -> int:
    """Encoder output frames (padding included) of an utterance: kaldi fbank
    (25 ms / 10 ms, snip_edges), 6 frames of right context, two Conv2d(3, s2)."""
    fbank = 1 + (round(seconds * SR) - 400) // 160
    t = (fbank + 6 - 3) // 2 + 1
    return (t - 3) // 2 + 1


def roofline(a, enc_frames: float, audio_s: float, tokens: int, levels: list[int],
             dtype_bytes: int = 2) -> dict:
    d, di, L = a.d_model, a.d_inner, a.n_layers_dec
    dec_layer = (4 * d * d + 3 * d) + (2 * d * d + 2 * d) + (2 * d * di + di + d) + 6 * d
    head = a.odim * d + 2 * d
    weights = (L * dec_layer + head) * dtype_bytes
    cross_kv = L * 2 * d * enc_frames * dtype_bytes          # per request per step
    self_kv = L * 2 * d * (tokens / 2 + 1) * dtype_bytes     # mean over the steps
    enc_fl = encoder_flops(a, enc_frames)
    out = {
        "assumptions": (
            "vLLM decode step reads all decoder weights once plus, per "
            "request, its cross-attention K/V (encoder frames) and self K/V; "
            "cross K/V projections run once per request (not per step); "
            "encoder at peak dense bf16 FLOP/s; mean utterance"),
        "decoder_weight_bytes_per_step": weights,
        "cross_kv_bytes_per_request_step": cross_kv,
        "self_kv_bytes_per_request_step_mean": self_kv,
        "encoder_flops_per_utterance": enc_fl,
        "mean_encoder_frames": enc_frames,
        "mean_audio_s": audio_s,
        # the original recomputes cross K/V of every layer at every step
        "original_cross_kv_recompute_flops_per_utterance_step": (
            L * 2 * 2 * enc_frames * d * d),
    }
    bw, peak = _device_lookup(BANDWIDTH), _device_lookup(PEAK_BF16)
    if bw and peak:
        out["bandwidth_bytes_per_s"] = bw
        out["peak_bf16_flops"] = peak
        out["by_concurrency"] = {}
        for b in levels:
            step_s = (weights + b * (cross_kv + self_kv)) / bw
            dec_s = tokens * step_s / b
            enc_s = enc_fl / peak
            out["by_concurrency"][str(b)] = {
                "decode_step_s": step_s,
                "tokens_per_s": b / step_s,
                "rtfx": audio_s / (dec_s + enc_s),
            }
    return out


# ------------------------------------------------------------ original ----
def import_original():
    """fireredasr.models.fireredasr imports modelscope at module level for
    ``from_pretrained`` (a modelscope download) only; the benchmark builds
    ``FireRedAsr`` from a local directory, so a stub stands in if needed."""
    try:
        import modelscope  # noqa: F401
    except ImportError:
        stub = types.ModuleType("modelscope")

        def snapshot_download(*a, **k):
            raise RuntimeError("modelscope stub: no downloads in the benchmark")

        stub.snapshot_download = snapshot_download
        sys.modules["modelscope"] = stub
    from fireredasr.data.asr_feat import ASRFeatExtractor
    from fireredasr.models import fireredasr as fr
    from fireredasr.tokenizer.aed_tokenizer import ChineseCharEnglishSpmTokenizer

    return fr, ASRFeatExtractor, ChineseCharEnglishSpmTokenizer


def run_original(ckpt: Path, utts: list[dict], plan: dict, tokens: int,
                 dtype_names: list[str], cuda: bool, on_result=None) -> dict:
    """The original pipeline, loaded once, timed at each dtype in turn
    (float32 first: the model is cast down between passes)."""
    import argparse as ap

    fr, ASRFeatExtractor, Tok = import_original()
    t0 = time.monotonic()
    # the original's loader; its torch.load needs argparse.Namespace
    # allow-listed under torch>=2.6 (weights_only=True by default)
    with torch.serialization.safe_globals([ap.Namespace]):
        model = fr.load_fireredasr_aed_model(str(ckpt / "model.pth.tar"))
    model.eval()
    params = {
        "encoder": sum(p.numel() for p in model.encoder.parameters()),
        "decoder": sum(p.numel() for p in model.decoder.parameters()),
    }
    if cuda:
        model.cuda()
    asr = fr.FireRedAsr(
        "aed", ASRFeatExtractor(str(ckpt / "cmvn.ark")), model,
        Tok(str(ckpt / "dict.txt"), str(ckpt / "train_bpe1000.model")))
    out: dict = {"load_s": round(time.monotonic() - t0, 2), "params": params,
                 "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    log(f"original: loaded in {out['load_s']}s, params {params}")
    args = {"use_gpu": int(cuda), "beam_size": 1, "nbest": 1,
            "decode_max_len": tokens, "softmax_smoothing": 1.0,
            "aed_length_penalty": 0.0, "eos_penalty": 1.0}
    inner = model.transcribe
    dev = "cuda" if cuda else "cpu"
    c1 = min(plan)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def batches(lo: int, hi: int, c: int):
        for i in range(lo, hi, c):
            chunk = utts[i:min(i + c, hi)]
            yield [u["id"] for u in chunk], [u["path"] for u in chunk]

    order = sorted(dtype_names, key=lambda n: n != "float32")
    for name in order:
        dtype = getattr(torch, name)
        model.to(dtype)
        if dtype != torch.float32:
            # 0.0.2 feeds fp32 features: cast them for a half model
            @functools.wraps(inner)
            def transcribe(feats, *a, _dtype=dtype, **k):
                return inner(feats.to(_dtype), *a, **k)

            model.transcribe = transcribe

        # every hypothesis has exactly `tokens` tokens (checked on one batch)
        ids, paths = next(batches(*plan[c1]["warmup"], c1))
        feats, lengths, _ = asr.feat_extractor(paths)
        with torch.no_grad():
            hyps = model.transcribe(feats.to(dev), lengths.to(dev), 1, 1, tokens,
                                    1.0, 0.0, 1.0)
        n_tok = [len(h[0]["yseq"]) for h in hyps]
        assert n_tok == [tokens] * len(n_tok), f"original decoded {n_tok} tokens"

        res: dict = {"dtype": name, "by_concurrency": {}, "texts_c1": {}}
        for c, p in plan.items():
            for ids, paths in batches(*p["warmup"], c):
                asr.transcribe(ids, paths, args)
            sync()
            lo, hi = p["timed"]
            t = time.monotonic()
            n_out = 0
            for ids, paths in batches(lo, hi, c):
                got = asr.transcribe(ids, paths, args)
                n_out += len(got)
                if c == c1:
                    res["texts_c1"].update({r["uttid"]: r["text"] for r in got})
            sync()
            wall = time.monotonic() - t
            audio = sum(u["seconds"] for u in utts[lo:hi])
            assert n_out == hi - lo
            res["by_concurrency"][str(c)] = {
                "requests": hi - lo, "batch_size": c, "audio_s": round(audio, 3),
                "wall_s": round(wall, 4), "rtfx": round(audio / wall, 2),
                "tokens_per_s": round((hi - lo) * tokens / wall, 1),
            }
            log(f"original {name} c={c}", res["by_concurrency"][str(c)])
        out[name] = res
        if on_result:
            on_result(out)
    model.transcribe = inner
    del asr, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- vLLM ----
def _generation_tokens(base: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:generation_tokens_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _vllm_levels(base: str, utts: list[dict], plan: dict, tokens: int) -> dict:
    import openai

    data = {}
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="EMPTY",
                                max_retries=0, timeout=900.0)
    model = (await client.models.list()).data[0].id

    def payload(u: dict) -> bytes:
        if u["id"] not in data:
            data[u["id"]] = Path(u["path"]).read_bytes()
        return data[u["id"]]

    async def one(u: dict, fmt: str = "json"):
        t = time.monotonic()
        r = await client.audio.transcriptions.create(
            model=model, file=(Path(u["path"]).name, payload(u)),
            response_format=fmt, temperature=0.0,
            extra_body={"max_completion_tokens": tokens})
        return r, time.monotonic() - t

    async def level(lo: int, hi: int, c: int):
        todo = list(range(lo, hi))[::-1]
        lat, texts = [], {}

        async def client_loop():
            while todo:
                i = todo.pop()
                r, dt = await one(utts[i])
                lat.append(dt)
                texts[utts[i]["id"]] = r.text

        t = time.monotonic()
        await asyncio.gather(*[client_loop() for _ in range(c)])
        return time.monotonic() - t, lat, texts

    # token count check: verbose_json lists the segment's tokens
    u0 = utts[plan[min(plan)]["warmup"][0]]
    r, _ = await one(u0, "verbose_json")
    got = sum(len(s.tokens) for s in r.segments)
    assert got == tokens, f"vLLM decoded {got} tokens, want {tokens}"

    res: dict = {"by_concurrency": {}, "texts_c1": {}}
    for c, p in plan.items():
        for _ in range(2 if c == min(plan) else 1):
            await level(*p["warmup"], c)
        lo, hi = p["timed"]
        before = _generation_tokens(base)
        wall, lat, texts = await level(lo, hi, c)
        gen = _generation_tokens(base) - before
        assert gen == (hi - lo) * tokens, f"generated {gen} tokens, want {(hi - lo) * tokens}"
        if c == min(plan):
            res["texts_c1"] = texts
        audio = sum(u["seconds"] for u in utts[lo:hi])
        lat.sort()
        res["by_concurrency"][str(c)] = {
            "requests": hi - lo, "audio_s": round(audio, 3),
            "wall_s": round(wall, 4), "rtfx": round(audio / wall, 2),
            "tokens_per_s": round(gen / wall, 1), "generated_tokens": int(gen),
            "latency_mean_s": round(statistics.mean(lat), 4),
            "latency_p50_s": round(lat[len(lat) // 2], 4),
            "latency_p90_s": round(lat[min(len(lat) - 1, int(0.9 * len(lat)))], 4),
        }
        log(f"vllm c={c}", res["by_concurrency"][str(c)])
    await client.close()
    return res


def run_vllm(ckpt: Path, utts: list[dict], plan: dict, tokens: int, a,
             log_path: Path) -> dict:
    from demo import serve

    cuda = torch.cuda.is_available()
    server_args = ["--dtype", a.dtype, "--max-num-seqs", str(max(plan)),
                   "--disable-uvicorn-access-log"]
    if cuda:
        server_args += ["--gpu-memory-utilization", str(a.gpu_memory_utilization)]
    else:
        server_args += ["--enforce-eager", "--max-model-len", "2048",
                        "--kv-cache-memory-bytes", str((256 if a.tiny else 4096) << 20)]
    server_args += shlex.split(a.server_args)
    t0 = time.monotonic()
    log("vllm: starting the API server, log", log_path)
    with serve(ckpt, server_args, timeout=a.server_timeout, log_path=log_path) as base:
        startup = time.monotonic() - t0
        log(f"vllm: server up after {startup:.1f}s")
        res = asyncio.run(_vllm_levels(base, utts, plan, tokens))
    res.update(dtype=a.dtype, server_args=server_args, startup_s=round(startup, 2))
    return res


def _agreement(a: dict, b: dict) -> dict:
    keys = sorted(set(a) & set(b))
    same = sum(a[k] == b[k] for k in keys)

    def prefix(x: str, y: str) -> int:
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        return n

    return {"utterances": len(keys), "identical_text": same,
            "mean_common_prefix_chars": round(
                statistics.mean(prefix(a[k], b[k]) for k in keys), 2) if keys else 0,
            "mean_text_chars": round(
                statistics.mean(len(a[k]) for k in keys), 2) if keys else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="result JSON")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny checkpoint of tools/make_fireredasr_checkpoint.py, "
                    "few short utterances (CPU smoke run)")
    ap.add_argument("--model-dir", type=Path,
                    help="release dir to use (made there, and kept, if missing); "
                    "default: a temporary dir, deleted at the end")
    ap.add_argument("--concurrency", default=None, help="default 1,16,64 (tiny 1,4)")
    ap.add_argument("--tokens", type=int, default=None,
                    help="tokens decoded per utterance by both systems "
                    "(default 48, about 5 per audio second; tiny 8)")
    ap.add_argument("--rounds", type=int, default=4,
                    help="timed requests per concurrency slot (default 4)")
    ap.add_argument("--min-requests", type=int, default=None,
                    help="at least this many timed requests per level "
                    "(default 16; tiny 4)")
    ap.add_argument("--min-seconds", type=float, default=None,
                    help="shortest utterance (default 5; tiny 2)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="longest utterance (default 15; tiny 4)")
    ap.add_argument("--dtype", default=None,
                    help="vLLM dtype (default bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--original-dtypes", default=None,
                    help="comma list of the original's dtypes (default "
                    "bfloat16,float32 on GPU; float32 on CPU)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    ap.add_argument("--server-args", default="",
                    help="extra arguments for the vLLM API server, one string: "
                    "--server-args=\"--enforce-eager --max-num-batched-tokens 16384\"")
    ap.add_argument("--server-timeout", type=float, default=480.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-original", action="store_true")
    ap.add_argument("--skip-vllm", action="store_true")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    a.concurrency = a.concurrency or ("1,4" if a.tiny else "1,16,64")
    a.tokens = a.tokens or (8 if a.tiny else 48)
    a.min_requests = a.min_requests or (4 if a.tiny else 16)
    a.min_seconds = a.min_seconds or (2.0 if a.tiny else 5.0)
    a.max_seconds = a.max_seconds or (4.0 if a.tiny else 15.0)
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    a.original_dtypes = a.original_dtypes or ("bfloat16,float32" if cuda else "float32")
    levels = sorted({int(c) for c in a.concurrency.split(",")})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

    result: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": {"torch": torch.__version__, "vllm": _version("vllm"),
                     "fireredasr": _version("fireredasr"),
                     "python": sys.version.split()[0]},
        "size": "tiny (tools/make_fireredasr_checkpoint.py)" if a.tiny
        else "FireRedASR-AED-L dims, random weights",
        "tokens_per_utterance": a.tokens,
        "length_control": (
            "<eos> row of the tied output projection zeroed in model.pth.tar "
            "(never argmax); original decode_max_len = vLLM "
            "max_completion_tokens = tokens_per_utterance; checked"),
        "decoding": "greedy (original beam_size=1, vLLM temperature=0)",
        "phases_s": {},
    }

    def save() -> None:
        a.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")

    def phase(name: str, t: float) -> None:
        result["phases_s"][name] = round(time.monotonic() - t, 2)
        log(f"phase {name}: {result['phases_s'][name]}s")
        save()

    tmp = Path(tempfile.mkdtemp(prefix="bench-fireredasr-"))
    try:
        t = time.monotonic()
        ckpt = a.model_dir or tmp / "FireRedASR-AED-L"
        if not (ckpt / "model.pth.tar").exists():
            log("making the release dir", ckpt)
            (make_tiny_release if a.tiny else make_real_release)(ckpt, a.seed)
        phase("make_checkpoint", t)
        ckpt_args = _load_package(ckpt / "model.pth.tar")["args"]
        result["dims"] = {k: getattr(ckpt_args, k) for k in (
            "idim", "odim", "n_layers_enc", "n_layers_dec", "n_head", "d_model",
            "d_inner", "kernel_size")}

        t = time.monotonic()
        plan, n_utts = plan_levels(levels, a.rounds, a.min_requests)
        utts = make_utterances(tmp / "wavs", n_utts, a.min_seconds, a.max_seconds,
                               a.seed)
        timed = [u for p in plan.values() for u in utts[slice(*p["timed"])]]
        result["audio"] = {
            "utterances_total": n_utts, "timed_utterances": len(timed),
            "duration_range_s": [a.min_seconds, a.max_seconds],
            "mean_s": round(statistics.mean(u["seconds"] for u in timed), 3),
            "signal": "gliding AM tone + noise, 16 kHz PCM-16 WAV, one file per request",
            "levels": {str(c): {"warmup": p["warmup"], "timed": p["timed"]}
                       for c, p in plan.items()},
        }
        phase("make_audio", t)

        frames = statistics.mean(encoder_frames(u["seconds"]) for u in timed)
        result["roofline"] = roofline(ckpt_args, frames, result["audio"]["mean_s"],
                                      a.tokens, levels)
        save()

        if not a.skip_original:
            t = time.monotonic()
            log(f"original ({a.original_dtypes}) ...")

            def partial(res: dict) -> None:
                result["original"] = {k: v for k, v in res.items()
                                      if isinstance(v, dict) and "by_concurrency" in v}
                result["original_load"] = {k: res[k] for k in (
                    "load_s", "params", "tf32_matmul")}
                save()

            try:
                run_original(ckpt, utts, plan, a.tokens,
                             a.original_dtypes.split(","), cuda, partial)
            except Exception as e:  # noqa: BLE001 -- the vLLM half still runs
                log("original FAILED:", traceback.format_exc())
                result["original_error"] = f"{type(e).__name__}: {e}"
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            phase("original", t)

        if not a.skip_vllm:
            t = time.monotonic()
            log_path = a.out.with_name(a.out.stem + ".server.log")
            try:
                result["vllm"] = run_vllm(ckpt, utts, plan, a.tokens, a, log_path)
            except Exception as e:  # noqa: BLE001 -- report it in the JSON
                log("vLLM FAILED:", traceback.format_exc())
                result["vllm_error"] = f"{type(e).__name__}: {e}"[:4000]
            phase("vllm", t)

        if "vllm" in result and result.get("original"):
            ratios = {}
            for c, ours in result["vllm"]["by_concurrency"].items():
                ratios[c] = {
                    f"vs_original_{dt}": round(
                        ours["rtfx"] / ref["by_concurrency"][c]["rtfx"], 2)
                    for dt, ref in result["original"].items()}
            result["ratios_rtfx_vllm_over_original"] = ratios
            result["text_agreement_c1"] = {
                f"vllm_vs_original_{dt}": _agreement(
                    result["vllm"]["texts_c1"], ref["texts_c1"])
                for dt, ref in result["original"].items()}
        result["phases_s"]["total"] = round(time.monotonic() - T0, 2)
        save()
        summary = {k: v for k, v in result.items()}
        for key in ("original", "vllm"):
            if key in summary:
                summary[key] = json.loads(json.dumps(summary[key]))
                for v in (summary[key].values() if key == "original"
                          else [summary[key]]):
                    v.pop("texts_c1", None)
        print(json.dumps(summary, indent=2, ensure_ascii=False), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
