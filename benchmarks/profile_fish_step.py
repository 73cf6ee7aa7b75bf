#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Where a Fish Speech decode step spends its time (GPU machine).

Runs the engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) on a checkpoint
made by bench_fish_speech.py and prints, for a batch-1 generate:

* frames/s;
* the GPU side: CUDA kernel time and kernel count per frame (torch.profiler),
  the 25 costliest kernels; kernel time well below the step time means the
  step is bound by host work, not by the GPU;
* the GPU timeline: time busy (union of kernel/copy intervals), the short
  gaps between consecutive kernels (<= ``--gap-us``, what CUDA-graph replay
  costs between nodes) and the long ones (the GPU waiting for the host);
* the host side: the cProfile of the engine step (``--cprofile``).

    python benchmarks/profile_fish_step.py --ckpt /tmp/fish-s1-bench \\
        [--torch-fast-loop [--fuse-fast-loop]] [--cprofile] [--no-async-scheduling]
"""

import argparse
import cProfile
import os
import pstats
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def gap_summary(intervals: list[tuple[float, float]], short_us: float) -> dict:
    """Busy time and idle gaps (us) of a GPU timeline given as the
    (start, end) intervals of its kernels and copies: overlapping intervals
    are merged; a gap is short when it lasts at most ``short_us``."""
    busy = short = long_ = 0.0
    n_short = n_long = 0
    end = None
    for s, e in sorted(intervals):
        if end is None or s > end:
            if end is not None:
                gap = s - end
                if gap <= short_us:
                    short, n_short = short + gap, n_short + 1
                else:
                    long_, n_long = long_ + gap, n_long + 1
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return {"busy_us": busy, "short_gaps_us": short, "short_gaps": n_short,
            "long_gaps_us": long_, "long_gaps": n_long}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/fish-s1-bench")
    ap.add_argument("--frames", type=int, default=128)
    ap.add_argument("--fuse-fast-loop", action="store_true")
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--torch-fast-loop", action="store_true",
                    help="hf_overrides fused_fast_block/fused_fast_sampler false "
                         "(the torch fast loop; the fused kernels are the default)")
    ap.add_argument("--no-async-scheduling", action="store_true",
                    help="schedule synchronously (async is the default)")
    ap.add_argument("--gap-us", type=float, default=5.0,
                    help="idle gaps up to this long count as inter-kernel gaps")
    a = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    overrides = {}
    if a.fuse_fast_loop:  # compiles the torch loop
        overrides["fuse_fast_loop"] = True
    if a.torch_fast_loop or a.fuse_fast_loop:
        overrides.update(fused_fast_block=False, fused_fast_sampler=False)
    llm = LLM(a.ckpt, dtype="bfloat16", max_model_len=4096, max_num_seqs=8,
              gpu_memory_utilization=0.6,
              async_scheduling=not a.no_async_scheduling,
              hf_overrides=overrides or None)
    prompt = TokensPrompt(prompt_token_ids=list(range(300, 364)))
    params = SamplingParams(max_tokens=a.frames, min_tokens=a.frames,
                            ignore_eos=True, detokenize=False, temperature=0.8,
                            top_p=0.8, repetition_penalty=1.1)
    llm.generate([prompt], params, use_tqdm=False)
    t0 = time.perf_counter()
    llm.generate([prompt], params, use_tqdm=False)
    dt = time.perf_counter() - t0
    print(f"batch 1: {a.frames / dt:.1f} frames/s ({dt / a.frames * 1e3:.2f} "
          "ms per frame)")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate([prompt], params, use_tqdm=False)
        torch.cuda.synchronize()
    stats = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    kernel_us = sum(e.self_device_time_total for e in stats)
    launches = sum(e.count for e in stats)
    print(f"GPU: {kernel_us / a.frames / 1e3:.2f} ms of kernels and "
          f"{launches / a.frames:.0f} kernels per frame")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=25))
    g = gap_summary([(e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA],
                    a.gap_us)
    f, n = a.frames * 1e3, a.frames
    print(f"GPU timeline per frame: busy {g['busy_us'] / f:.2f} ms; "
          f"{g['short_gaps'] / n:.0f} gaps <= {a.gap_us:g} us, "
          f"{g['short_gaps_us'] / f:.2f} ms; {g['long_gaps'] / n:.0f} longer, "
          f"{g['long_gaps_us'] / f:.2f} ms")
    if a.cprofile:
        p = cProfile.Profile()
        p.enable()
        llm.generate([prompt], params, use_tqdm=False)
        p.disable()
        pstats.Stats(p).sort_stats("cumulative").print_stats(45)


if __name__ == "__main__":
    main()
