# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""SoulX-Podcast dialogue LM: vLLM vs the original's HF engine loop.

A dialogue of ``--turns`` turns (two speakers, the presets of the release's
``spk2info.pt``), every turn generating exactly ``--tokens`` speech tokens
(min = max length), generated turn after turn in the context of the turns
before, as ``SoulXPodcast.forward_longform`` does.

* vLLM: an in-process ``AsyncLLM`` on the release directory
  (``SoulXPodcastForCausalLM``, the model's own RAS sampler, prefix caching
  on); ``c`` dialogues run concurrently, each turn one engine request built
  by the model's prompt hook (as ``/v1/audio/speech`` builds it).
* original (``--original-src``: a checkout of Soul-AILab/SoulX-Podcast, e.g.
  5ac9c0e): its HF engine, i.e. transformers ``generate`` with
  ``custom_generate=_ras_sample_hf_engine`` (RAS window 25, tau 0.2), the
  same processors and one ``DynamicCache`` carried across the turns of a
  dialogue; dialogues one after another (the original serves one at a time),
  so only ``c = 1`` is timed for it. Its sampler was written for
  transformers 4.5x; on transformers 5 the one method it calls that is gone
  (``_get_initial_cache_position``) is shimmed to pass its kwargs on.

Reported per level: dialogues, wall time, speech tokens/s (aggregate),
mean turn latency, and the vLLM/original ratio at c = 1. No audio decoding
(the flow + HiFT decoder is benchmarked in ``bench_cosyvoice_token2wav.py``).
Random weights at the release size (SoulX-Podcast-1.7B LM; ``--tiny``: tiny
dims for a CPU smoke run), release directory made at run time by
``tools/make_soulx_podcast_checkpoint.py``.

    python benchmarks/bench_soulx_podcast.py --original-src <SoulX-Podcast> \\
        --out results/soulx_podcast-h200.json
    python benchmarks/bench_soulx_podcast.py --tiny   # CPU smoke run

Run from outside the repository root (or with PYTHONSAFEPATH=1) so that the
repository's ``vllm/`` does not shadow the installed package.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT_TURNS = [
    "Hello everyone, and welcome back to the show.",
    "Thanks for having me, it is great to be here today.",
    "Let us start with the news of the week.",
    "Sure, there is a lot to talk about.",
]


def _script(turns: int) -> str:
    return "".join(
        f"[S{1 + i % 2}]{SCRIPT_TURNS[i % len(SCRIPT_TURNS)]}" for i in range(turns)
    )


def _make_release_dir(args, out: Path) -> Path:
    sys.path.insert(0, str(REPO / "tools"))
    from make_soulx_podcast_checkpoint import make_release_dir

    # The LM alone is timed: flow.pt / hift.pt are only placeholders (they
    # mark the directory as a SoulX-Podcast release)
    out = make_release_dir(out, "tiny" if args.tiny else "real", audio=False)
    for name in ("flow.pt", "hift.pt"):
        torch.save({}, out / name)
    return out


def _summary(turn_s: list[float], tokens: int, wall: float, n: int) -> dict:
    return {
        "dialogues": n,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "turn_latency_s": round(sum(turn_s) / max(1, len(turn_s)), 4),
    }


# ----------------------------------------------------------------- vLLM ----
async def _vllm_run(args, model_dir: Path) -> dict:
    from vllm.config.text_to_speech import TextToSpeechParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.model_executor.models.soulx_podcast import SoulXPodcastForCausalLM as M
    from vllm.v1.engine.async_llm import AsyncLLM

    levels = [int(c) for c in args.concurrency.split(",")]
    kw: dict[str, Any] = dict(
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
    base = TextToSpeechParams(
        text=_script(args.turns), model_config=mc, voices=["spk_a", "spk_b"]
    )
    segs = M.split_speech_text(base)
    counter = [0]

    async def dialogue(turn_s: list[float]) -> int:
        context: list[tuple[str, list[int]]] = []
        n = 0
        for seg in segs:
            p = TextToSpeechParams(text=seg, model_config=mc, voices=["spk_a", "spk_b"])
            p.context = list(context)
            prompt = M.get_speech_generation_prompt(p)
            sp = M.get_speech_sampling_params(p, {"max_tokens": args.tokens})
            sp.min_tokens = sp.max_tokens = args.tokens
            counter[0] += 1
            t = time.monotonic()
            out = None
            async for out in engine.generate(prompt, sp, f"soulx-{counter[0]}"):
                pass
            turn_s.append(time.monotonic() - t)
            ids = list(out.outputs[0].token_ids)
            context.append((seg, ids))
            n += len(ids)
        return n

    res: dict[str, Any] = {"ready_s": round(ready_s, 1), "levels": {}}
    await asyncio.gather(*(dialogue([]) for _ in range(2)))  # warm up
    for c in levels:
        turn_s: list[float] = []
        t = time.monotonic()
        counts = await asyncio.gather(
            *(dialogue(turn_s) for _ in range(c * args.requests))
        )
        wall = time.monotonic() - t
        res["levels"][str(c)] = _summary(turn_s, sum(counts), wall, len(counts))
        print(f"vllm c={c}: {res['levels'][str(c)]}", flush=True)
    engine.shutdown()
    return res


# ------------------------------------------------------------- original ----
def _load_original_sampler(src: Path) -> Any:
    """``_ras_sample_hf_engine`` from the checkout (its module only: the
    package ``__init__`` pulls s3tokenizer and onnxruntime)."""
    path = src / "soulxpodcast" / "models" / "modules" / "sampler.py"
    spec = importlib.util.spec_from_file_location("soulx_original_sampler", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod._ras_sample_hf_engine


def _original_run(args, model_dir: Path) -> dict:
    """The original's HFLLMEngine.generate + forward_longform loop."""
    from transformers import (
        AutoTokenizer,
        DynamicCache,
        EosTokenCriteria,
        Qwen3ForCausalLM,
        RepetitionPenaltyLogitsProcessor,
        StoppingCriteriaList,
    )

    from vllm.model_executor.models.soulx_podcast import (
        parse_dialogue,
        speaker_prompt_text,
        turn_text,
    )

    ras = _load_original_sampler(Path(args.original_src))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    tok = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
    model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=dtype).to(dev).eval()
    if not hasattr(model, "_get_initial_cache_position"):
        # transformers >= 5 tracks no cache_position in generate; the
        # original's loop (written for 4.5x) only passes model_kwargs on
        model._get_initial_cache_position = lambda n, device, kw: kw
    soulx = json.loads((model_dir / "soulxpodcast_config.json").read_text())
    eos, offset = soulx["eos_token_id"], soulx["speech_token_offset"]
    presets = torch.load(model_dir / "spk2info.pt", weights_only=True)
    prompts = []
    for i, name in enumerate(("spk_a", "spk_b")):
        speech = presets[name]["llm_prompt_speech_token"].reshape(-1) + offset
        prompts.append(
            tok.encode(speaker_prompt_text(i, presets[name]["prompt_text"]))
            + speech.tolist()
            + [eos]
        )
    turns = [
        tok.encode(turn_text(s, t)) for s, t in parse_dialogue(_script(args.turns))
    ]

    def generate(inputs: list[int], cache: Any) -> list[int]:
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([inputs], device=dev),
                do_sample=True,
                top_k=100,
                top_p=0.9,
                temperature=0.6,
                min_new_tokens=args.tokens,
                max_new_tokens=args.tokens,
                stopping_criteria=StoppingCriteriaList(
                    [EosTokenCriteria(eos_token_id=eos)]
                ),
                past_key_values=cache,
                custom_generate=partial(ras, use_ras=True, win_size=25, tau_r=0.2),
                use_cache=True,
                logits_processor=[
                    RepetitionPenaltyLogitsProcessor(
                        1.25, prompt_ignore_length=len(inputs)
                    )
                ],
            )
        return out[0, len(inputs) :].tolist()

    def dialogue(turn_s: list[float]) -> int:
        inputs = [t for p in prompts for t in p]  # < 10 turns: no reset here
        cache = DynamicCache(config=model.config)
        n = 0
        for text_ids in turns:
            inputs = inputs + text_ids
            t = time.monotonic()
            ids = generate(inputs, cache)
            if dev == "cuda":
                torch.cuda.synchronize()
            turn_s.append(time.monotonic() - t)
            inputs = inputs + ids
            n += len(ids)
        return n

    dialogue([])  # warm up
    turn_s: list[float] = []
    t = time.monotonic()
    counts = [dialogue(turn_s) for _ in range(args.requests)]
    wall = time.monotonic() - t
    res = {"levels": {"1": _summary(turn_s, sum(counts), wall, len(counts))}}
    print(f"original c=1: {res['levels']['1']}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny dims (CPU smoke run)")
    ap.add_argument("--model-dir", help="existing release dir (default: make one)")
    ap.add_argument("--original-src", help="SoulX-Podcast checkout (original loop)")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=None, help="per turn")
    ap.add_argument("--requests", type=int, default=None, help="dialogues per c")
    ap.add_argument("--concurrency", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    ap.add_argument("--out")
    args = ap.parse_args()
    args.tokens = args.tokens or (16 if args.tiny else 250)
    args.requests = args.requests or (1 if args.tiny else 2)
    args.concurrency = args.concurrency or ("1,2" if args.tiny else "1,4,16")
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = (
            Path(args.model_dir)
            if args.model_dir
            else _make_release_dir(args, Path(tmp) / "SoulX-Podcast")
        )
        results: dict[str, Any] = {
            "device": torch.cuda.get_device_name()
            if torch.cuda.is_available()
            else "cpu",
            "turns": args.turns,
            "tokens_per_turn": args.tokens,
            "vllm": asyncio.run(_vllm_run(args, model_dir)),
        }
        if args.original_src:
            results["original"] = _original_run(args, model_dir)
            v = results["vllm"]["levels"].get("1")
            o = results["original"]["levels"]["1"]
            if v:
                results["ratio_tokens_per_s_c1"] = round(
                    v["tokens_per_s"] / o["tokens_per_s"], 2
                )
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
