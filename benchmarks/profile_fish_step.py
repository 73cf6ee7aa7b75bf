#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Where a Fish Speech decode step spends its time (GPU machine).

Runs the engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) on a checkpoint
made by bench_fish_speech.py and prints the cProfile of a batch-1 generate
and CUDA-synchronised timings of the model's pieces.

    python benchmarks/profile_fish_step.py --ckpt /tmp/fish-s1-bench
"""

import argparse
import cProfile
import os
import pstats
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/fish-s1-bench")
    ap.add_argument("--frames", type=int, default=128)
    a = ap.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(a.ckpt, dtype="bfloat16", max_model_len=4096, max_num_seqs=8,
              gpu_memory_utilization=0.6)
    prompt = TokensPrompt(prompt_token_ids=list(range(300, 364)))
    params = SamplingParams(max_tokens=a.frames, min_tokens=a.frames,
                            ignore_eos=True, detokenize=False, temperature=0.8,
                            top_p=0.8, repetition_penalty=1.1)
    llm.generate([prompt], params, use_tqdm=False)
    t0 = time.perf_counter()
    llm.generate([prompt], params, use_tqdm=False)
    dt = time.perf_counter() - t0
    print(f"batch 1: {a.frames / dt:.1f} frames/s")
    prof = cProfile.Profile()
    prof.enable()
    llm.generate([prompt], params, use_tqdm=False)
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(45)


if __name__ == "__main__":
    main()
