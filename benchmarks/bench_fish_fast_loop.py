#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The Fish fast loop alone: one frame's residual codebooks, outside the engine.

Times the loop as the engine runs it (replayed from a CUDA graph per batch
bucket, ``FastLoopGraphs``) with the torch ops and with the fused kernels
(``fused_fast_block``: vLLM's CUDA ops in the fast layers;
``fused_fast_sampler``: the Triton sampler), counts its kernels per frame
(torch.profiler) and checks that the paths give the same greedy codes.
Random weights at S1-mini or S2-Pro fast-transformer size
(``tools/fish_fast_loop.py``: linear weights scaled by fan-in).

    python benchmarks/bench_fish_fast_loop.py --batch 1 8 64 [--size s2-pro]
        [--dtype float32] [--out results.json]

``--tiny`` runs on the CPU (a check of the script only; the fused block on
vLLM's CPU ops, the torch sampler).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from fish_fast_loop import make_fast_loop  # noqa: E402

SIZES = {
    "s1-mini": dict(fast_dim=1024, fast_n_head=16, fast_n_local_heads=8,
                    fast_head_dim=64, fast_intermediate_size=3072,
                    n_fast_layer=4, codebook_size=4096, qk_norm=False),
    "s2-pro": dict(fast_dim=2560, fast_n_head=32, fast_n_local_heads=8,
                   fast_head_dim=128, fast_intermediate_size=9728,
                   n_fast_layer=4, codebook_size=4096, qk_norm=True),
    "tiny": dict(fast_dim=64, fast_n_head=4, fast_n_local_heads=2,
                 fast_head_dim=16, fast_intermediate_size=128,
                 n_fast_layer=2, codebook_size=256, qk_norm=False),
}


def make_loop(size: str, version: str, device, dtype, fused: bool):
    return make_fast_loop(SIZES[size], version=version, fused=fused,
                          device=device, dtype=dtype)


def loop_inputs(m, rows: int, device, greedy: bool):
    g = torch.Generator(device=device).manual_seed(rows)
    hidden = torch.randn(rows, m.config.fast_dim, generator=g, device=device)
    top = min(1024, m.codebook_size)
    c0 = torch.randint(0, top, (rows,), generator=g, device=device)
    window = torch.randint(0, top, (rows, 16, m.num_codebooks + 1), generator=g,
                           device=device)
    f = torch.full((rows,), 1.0, device=device)
    return (hidden.to(m.fast_output.weight.dtype), c0,
            torch.full((rows,), greedy, device=device),
            f * (0.0 if greedy else 0.8), f * 0.8, f * 1.1,
            torch.full((rows,), m.codebook_size, device=device), window)


def run(m, rows, device, iters, use_graph):
    from vllm.model_executor.models.fish_speech_fast import FastLoopGraphs

    fn = m._fast_loop_sampled
    graphs = FastLoopGraphs(fn) if use_graph else None
    args = loop_inputs(m, rows, device, greedy=False)
    call = (lambda: graphs(*args)) if graphs else (lambda: fn(*args))
    with torch.no_grad():
        for _ in range(3):
            call()
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            call()
        sync()
        dt = (time.perf_counter() - t0) / iters
        kernels = None
        if device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    call()
                sync()
            kernels = sum(e.count for e in prof.key_averages()
                          if e.self_device_time_total > 0) / 5
        greedy_args = loop_inputs(m, rows, device, greedy=True)
        codes = (graphs(*greedy_args) if graphs else fn(*greedy_args)).cpu()
    return {"ms_per_frame": round(dt * 1e3, 4), "kernels_per_frame": kernels}, codes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), default="s1-mini")
    ap.add_argument("--version", choices=["s1", "s2"], default=None,
                    help="sampler family (default: s2 for s2-pro, else s1)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tiny", action="store_true", help="CPU check of the script")
    ap.add_argument("--out")
    a = ap.parse_args()
    size = "tiny" if a.tiny else a.size
    version = a.version or ("s2" if size == "s2-pro" else "s1")
    device = torch.device("cpu" if a.tiny else "cuda")
    dtype = getattr(torch, a.dtype)
    # on the CPU "fused" is the fused block on vLLM's CPU ops (no Triton)
    modes = [("torch", False), ("fused", True)]
    res = {"size": size, "version": version, "dtype": a.dtype,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "by_batch": {}}
    for rows in a.batch:
        entry, codes = {}, {}
        for name, fused in modes:
            m = make_loop(size, version, device, dtype, fused)
            entry[name], codes[name] = run(m, rows, device, a.iters,
                                           use_graph=device.type == "cuda")
            del m
        if "fused" in codes:
            entry["greedy_codes_equal"] = float(
                (codes["fused"] == codes["torch"]).float().mean())
            entry["speedup"] = round(entry["torch"]["ms_per_frame"]
                                     / entry["fused"]["ms_per_frame"], 2)
        res["by_batch"][str(rows)] = entry
        print(rows, json.dumps(entry), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
