# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""CosyVoice2 end to end: vLLM (CosyVoice2ForCausalLM + flow/HiFT decoder)
against the original PyTorch pipeline (cosyvoice-minicpmo: Qwen2LM on HF
transformers + CosyVoice2Model token2wav), in the same run, random weights.

For each concurrency level (default 1, 4, 16), two passes per system:

* ``lm``: the LM alone, aggregate speech tokens/s;
* ``tts``: text -> streamed audio; time to first audio (first non-empty
  chunk), request latency, and RTF = latency / audio seconds (mean over
  requests; ``rtf_aggregate`` = wall / total audio seconds).

Every request generates exactly ``--tokens`` speech tokens in both systems
(min = max length), with the zero-shot speaker ``spk_a`` of the
directory's ``spk2info.pt``, so the work is identical. vLLM side: an
in-process ``AsyncLLM`` and the API server's own decode worker
(``DecodeWorker``, one thread, batching) and streaming sessions, fed as
``/v1/audio/speech`` feeds them (the decoder's ``stream_chunk_frames``).
Original side: one shared ``CosyVoice2Model`` called from ``c`` threads
(``tts(stream=True)``, its LLM in a thread per request), as its servers do.

    python benchmarks/bench_cosyvoice2.py --out results/cosyvoice2-h100.json
    python benchmarks/bench_cosyvoice2.py --tiny          # CPU smoke run

Needs ``cosyvoice-minicpmo`` (+ its flow deps: see tools/requirements-test.txt)
importable. Run from outside the repository root (or with PYTHONSAFEPATH=1)
so that the repository's ``vllm/`` does not shadow the installed package.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from make_cosyvoice2_checkpoint import (  # noqa: E402
    install_matcha_logger_shim,
    make_release_dir,
)

TEXT = (
    "Hello, this is a benchmark of CosyVoice two running inside vLLM, "
    "compared with the original implementation."
)


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


# ---------------------------------------------------------------- vLLM ----
async def _vllm_run(args, model_dir: Path) -> dict:
    from vllm.config.text_to_speech import TextToSpeechParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.text_to_speech.serving import DecodeWorker
    from vllm.inputs import TokensPrompt
    from vllm.model_executor.models.cosyvoice2 import CosyVoice2ForCausalLM as M
    from vllm.v1.engine.async_llm import AsyncLLM

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
    prompt = TokensPrompt(**M.get_speech_generation_prompt(params))
    voice = params.voice
    sp = M.get_speech_sampling_params(
        params,
        {"temperature": 1.0, "top_p": 0.8, "top_k": 25, "max_tokens": args.tokens},
    )
    sp.min_tokens = sp.max_tokens = args.tokens
    counter = [0]

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
                new = frames[sent:]
                audio = await worker.call(lambda new=new: session.decode(new))
                sent = n
                if audio.size and ttfa is None:
                    ttfa = time.monotonic() - t
                samples += audio.size
        audio = await worker.call(session.finish)
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
        n = max(c, args.requests if c == 1 else c * args.rounds)
        sem = asyncio.Semaphore(c)

        async def one():
            async with sem:
                return await fn()

        t = time.monotonic()
        reqs = await asyncio.gather(*[one() for _ in range(n)])
        return _summary(list(reqs), time.monotonic() - t, sr)

    # warm-up with the timed sampling parameters
    await asyncio.gather(*[tts() for _ in range(min(2, max(levels)))])
    res: dict = {"engine_ready_s": round(ready_s, 2), "lm": {}, "tts": {}}
    for c in levels:
        res["lm"][str(c)] = await level(lm_only, c)
        res["tts"][str(c)] = await level(tts, c)
        print("vllm", c, res["lm"][str(c)], res["tts"][str(c)], flush=True)
    engine.shutdown()
    return res


# ------------------------------------------------------------ original ----
def _original_run(args, model_dir: Path) -> dict:
    install_matcha_logger_shim()
    from cosyvoice.cli.model import CosyVoice2Model
    from cosyvoice.llm.llm import Qwen2Encoder, Qwen2LM
    from cosyvoice.utils.common import ras_sampling

    from vllm.model_executor.models.cosyvoice2 import get_cosyvoice2_tokenizer
    from vllm.transformers_utils.cosyvoice2 import cosyvoice2_config_dict

    sys.path.insert(0, str(REPO / "tools"))
    from make_cosyvoice2_checkpoint import REAL, TINY, _flow_hift  # noqa: PLC0415

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    # transformers >= 5 reads the [1, 1] all-ones decode mask of
    # Qwen2Encoder.forward_one_step as "last key only"; drop it as the
    # transformers the original pins (4.51) did.
    hf = lm.llm.model
    orig_forward = hf.forward

    def forward(*a, attention_mask=None, **k):
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        return orig_forward(*a, attention_mask=attention_mask, **k)

    hf.forward = forward
    lm = lm.to(dev).eval()
    # same flow/HiFT weights as the release dir (the maker is deterministic)
    flow, hift = _flow_hift(TINY if args.tiny else REAL, args.seed)
    flow.load_state_dict(torch.load(model_dir / "flow.pt", weights_only=True))
    hift.load_state_dict(torch.load(model_dir / "hift.pt", weights_only=True))
    model = CosyVoice2Model(
        lm, flow.to(dev).eval(), hift.to(dev).eval(), fp16=args.ref_fp16
    )
    model.llm = lm

    text_ids = get_cosyvoice2_tokenizer(str(model_dir / "CosyVoice-BlankEN")).encode(
        args.text
    )
    ratio = (args.tokens + 0.5) / len(text_ids)
    lm.inference = partial(
        lm.inference, min_token_text_ratio=ratio, max_token_text_ratio=ratio
    )
    spk = torch.load(model_dir / "spk2info.pt", weights_only=True)["spk_a"]
    text = torch.tensor([text_ids], dtype=torch.int32)
    sr = 24000

    def lm_only() -> dict:
        n = 0
        with torch.inference_mode():
            for _ in lm.inference(
                text=text.to(dev),
                text_len=torch.tensor([text.shape[1]], dtype=torch.int32).to(dev),
                prompt_text=spk["prompt_text"].to(dev),
                prompt_text_len=torch.tensor(
                    [spk["prompt_text"].shape[1]], dtype=torch.int32
                ).to(dev),
                prompt_speech_token=spk["llm_prompt_speech_token"].to(dev),
                prompt_speech_token_len=torch.tensor(
                    [spk["llm_prompt_speech_token"].shape[1]], dtype=torch.int32
                ).to(dev),
                embedding=spk["llm_embedding"].to(dev),
            ):
                n += 1
        _sync()
        return {"tokens": n, "samples": 0}

    def tts() -> dict:
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
            "tokens": args.tokens,
            "samples": samples,
            "ttfa": ttfa,
            "latency": time.monotonic() - t,
        }

    def level(fn, c: int) -> dict:
        n = max(c, args.requests if c == 1 else c * args.rounds)
        results: list[dict] = []
        lock = threading.Lock()
        todo = list(range(n))

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

    tts()  # warm-up
    levels = [int(c) for c in args.concurrency.split(",")]
    res: dict = {"lm": {}, "tts": {}}
    for c in levels:
        if c > args.ref_max_concurrency:
            continue
        res["lm"][str(c)] = level(lm_only, c)
        res["tts"][str(c)] = level(tts, c)
        print("original", c, res["lm"][str(c)], res["tts"][str(c)], flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="tiny random dims (CPU smoke run) instead of CosyVoice2-0.5B's",
    )
    ap.add_argument("--model-dir", help="existing release dir (default: make one)")
    ap.add_argument("--concurrency", default=None, help="default 1,4,16 (tiny: 1,4)")
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
        "--ref-fp16",
        action="store_true",
        help="original flow in fp16 (its fp16=True mode)",
    )
    ap.add_argument("--ref-max-concurrency", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-original", action="store_true")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    args.concurrency = args.concurrency or ("1,4" if args.tiny else "1,4,16")
    args.tokens = args.tokens or (30 if args.tiny else 250)
    args.requests = args.requests or (2 if args.tiny else 5)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = (
            Path(args.model_dir)
            if args.model_dir
            else make_release_dir(
                Path(tmp) / "CosyVoice2", "tiny" if args.tiny else "real", args.seed
            )
        )
        results = {
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "size": "tiny" if args.tiny else "CosyVoice2-0.5B dims (random)",
            "tokens_per_request": args.tokens,
            "vllm_dtype": args.dtype,
            "original_dtype": "fp32 LM, fp16 flow" if args.ref_fp16 else "fp32",
            "text": args.text,
        }
        results["vllm"] = asyncio.run(_vllm_run(args, model_dir))
        if not args.skip_original:
            results["original"] = _original_run(args, model_dir)
            for part in ("lm", "tts"):
                for c, ours in results["vllm"][part].items():
                    ref = results["original"][part].get(c)
                    if ref:
                        key = "tokens_per_s" if part == "lm" else "rtf_aggregate"
                        results.setdefault("ratios", {})[f"{part}_c{c}_{key}"] = round(
                            (ours[key] / ref[key])
                            if part == "lm"
                            else (ref[key] / ours[key]),
                            2,
                        )
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
