#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Fish Speech (OpenAudio S1 layout) dual-AR LM: vLLM vs the original loop.

Random weights at S1-mini size (28 slow layers of dim 1024, 4 fast layers,
10 codebooks of 4096, vocab 155776) saved in the original release layout,
then, in the same process and on the same GPU:

* the original PyTorch inference loop of ``fish_speech==0.1.0``
  (``init_model`` + ``generate``: batch 1, optionally ``--compile``), one
  request after another; for ``--size s2-pro`` (S2-Pro dimensions, sharded
  safetensors) the S2 original from a fish-speech checkout at 3dd1f85
  (``--original-src``), on the same prompt ids;
* vLLM (this patch set) with concurrency 1, 8 and 64.

Reported: generated frames per second (aggregate and per request), time to
first frame (latency of a 1-frame request at that concurrency), their ratio
to the original, and the bytes-per-frame roofline at batch 1 (weights read
per frame over the GPU's memory bandwidth).

    python benchmarks/bench_fish_speech.py --out result.json [--size tiny]
    python benchmarks/bench_fish_speech.py --out s2.json --size s2-pro \
        --ckpt /tmp/fish-s2-bench --original-src /path/to/fish-speech
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

S1_MINI = dict(
    dim=1024, n_layer=28, n_head=16, n_local_heads=8, head_dim=128,
    intermediate_size=3072, n_fast_layer=4, fast_dim=1024, fast_n_head=16,
    fast_n_local_heads=8, fast_head_dim=64, fast_intermediate_size=3072,
    max_seq_len=8192, rope_base=1000000.0, norm_eps=1e-6, num_codebooks=10,
    dropout=0.0, tie_word_embeddings=False, use_gradient_checkpointing=True,
    is_reward_model=False,
)
S1_MINI_RANKS = 151643  # vocab = ranks + 15 specials + 4096 semantic
S1_MINI_CODEBOOK = 4096
# fishaudio/s2-pro config.json (text_config + audio_decoder_config), with
# max_seq_len 4096 for both systems: the original attends over its whole
# static cache, so a 32k cache would slow it for nothing
S2_PRO = dict(
    dim=2560, n_layer=36, n_head=32, n_local_heads=8, head_dim=128,
    intermediate_size=9728, n_fast_layer=4, fast_dim=2560, fast_n_head=32,
    fast_n_local_heads=8, fast_head_dim=128, fast_intermediate_size=9728,
    max_seq_len=4096, rope_base=1000000.0, norm_eps=1e-6, num_codebooks=10,
)
S2_PRO_VOCAB = 155776
S2_PRO_CODEBOOK = 4096
TEXT = ("Hello world, this is a benchmark of the dual autoregressive "
        "text to speech model served by vLLM.")
# Peak HBM bandwidth (bytes/s) by device name fragment.
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def bandwidth() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    for key, bw in BANDWIDTH.items():
        if key in name:
            return bw
    return None


def roofline(cfg: dict, vocab: int, codebook: int, dtype_bytes: int = 2) -> dict:
    """Weight bytes read per generated frame at batch 1."""
    d, hd = cfg["dim"], cfg["head_dim"]
    q, kv = cfg["n_head"] * hd, cfg["n_local_heads"] * hd
    slow_layer = d * (q + 2 * kv) + q * d + 3 * d * cfg["intermediate_size"]
    fd, fhd = cfg["fast_dim"], cfg["fast_head_dim"]
    fq, fkv = cfg["fast_n_head"] * fhd, cfg["fast_n_local_heads"] * fhd
    fast_layer = fd * (fq + 2 * fkv) + fq * fd + 3 * fd * cfg["fast_intermediate_size"]
    k = cfg["num_codebooks"]
    slow = cfg["n_layer"] * slow_layer
    head_full = vocab * d
    head_semantic = (codebook + 1) * d
    # the fast transformer runs k positions (hidden + k-1 codes) per frame,
    # each reading all fast layers; the fast head runs k-1 times
    fast = k * cfg["n_fast_layer"] * fast_layer + (k - 1) * codebook * fd
    out = {
        "slow_layers_bytes": slow * dtype_bytes,
        "slow_head_full_bytes": head_full * dtype_bytes,
        "slow_head_semantic_bytes": head_semantic * dtype_bytes,
        "fast_bytes": fast * dtype_bytes,
    }
    out["bytes_per_frame_full_head"] = (slow + head_full + fast) * dtype_bytes
    out["bytes_per_frame_semantic_head"] = (slow + head_semantic + fast) * dtype_bytes
    bw = bandwidth()
    if bw:
        out["bandwidth_bytes_per_s"] = bw
        for key in ("full_head", "semantic_head"):
            t = out[f"bytes_per_frame_{key}"] / bw
            out[f"roofline_frames_per_s_{key}"] = 1.0 / t
    return out


def make_checkpoint(out: Path, size: str) -> None:
    import make_fish_checkpoint as mfc

    if (out / "config.json").exists():
        return
    if size == "s2-pro":
        mfc.make_s2(out, seed=0, dtype=torch.bfloat16, dims=S2_PRO,
                    codebook_size=S2_PRO_CODEBOOK, vocab_size=S2_PRO_VOCAB)
    elif size == "tiny":
        mfc.make_s1(out, seed=0, dtype=torch.bfloat16)
    else:
        mfc.make_s1(out, seed=0, dtype=torch.bfloat16, dims=S1_MINI,
                    codebook_size=S1_MINI_CODEBOOK, n_ranks=S1_MINI_RANKS)


def bench_original(ckpt: Path, frames: int, compile_: bool, sampling: dict) -> dict:
    import make_fish_checkpoint as mfc

    mfc.import_reference_llama()
    from fish_speech.content_sequence import ContentSequence, TextPart
    from fish_speech.models.text2semantic import inference as ref

    model, decode_one_token = ref.init_model(
        str(ckpt), "cuda", torch.bfloat16, compile=compile_)
    seq = ContentSequence(modality="interleave")
    seq.append([TextPart(text=TEXT)], add_end=False, speaker=0)
    prompt, _, _ = seq.encode_for_inference(
        model.tokenizer, num_codebooks=model.config.num_codebooks)
    prompt = prompt.cuda()
    kw = {k: torch.tensor(v, device="cuda", dtype=torch.float)
          for k, v in sampling.items()}

    def run(n: int) -> tuple[float, int]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = ref.generate(model=model, prompt=prompt, max_new_tokens=n,
                         audio_masks=None, audio_parts=None,
                         decode_one_token=decode_one_token, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, y.shape[1] - prompt.shape[1]

    for _ in range(2):  # warm-up (and compilation)
        run(16)
    # max_new_tokens=1 crashes the original's decode_n_tokens (its loop
    # variable is unbound): time 2 frames and take off one decode step
    t2, _ = run(2)
    dt, n = run(frames)
    ttff = t2 - (dt - t2) / max(n - 2, 1)
    model = None  # free the weights (run() holds the name)
    torch.cuda.empty_cache()
    return {"frames": n, "seconds": dt, "frames_per_s": n / dt,
            "time_to_first_frame_s": ttff, "prompt_tokens": int(prompt.shape[1]),
            "compile": compile_}


def import_original_s2(src: Path):
    """The original S2 modules from a fish-speech checkout (no PyPI release
    holds them), imported as the golden-fixture script does."""
    import importlib.util

    path = REPO / "tests/models/speech/fixtures/fish_lm/make_fixture.py"
    spec = importlib.util.spec_from_file_location("fish_lm_fixture", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.import_original(str(src))


def bench_original_s2(src: Path, ckpt: Path, frames: int, compile_: bool,
                      sampling: dict, prompt_ids: list[int]) -> dict:
    """fish-speech S2 (``init_model`` + ``generate``, batch 1) on the same
    prompt ids as vLLM (text only: codebook rows are zero)."""
    _, ref = import_original_s2(src)
    model, decode_one_token = ref.init_model(
        str(ckpt), "cuda", torch.bfloat16, compile=compile_)
    k = model.config.num_codebooks
    ids = torch.tensor(prompt_ids, dtype=torch.int)
    prompt = torch.cat([ids[None], torch.zeros(k, ids.numel(), dtype=torch.int)]).cuda()

    def run(n: int) -> tuple[float, int]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = ref.generate(model=model, prompt=prompt, max_new_tokens=n,
                         audio_masks=None, audio_parts=None,
                         decode_one_token=decode_one_token, **sampling)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, y.shape[1] - prompt.shape[1]

    for _ in range(2):  # warm-up (and compilation)
        run(16)
    t2, _ = run(2)
    dt, n = run(frames)
    ttff = t2 - (dt - t2) / max(n - 2, 1)
    model = None  # free the weights (run() holds the name)
    torch.cuda.empty_cache()
    return {"frames": n, "seconds": dt, "frames_per_s": n / dt,
            "time_to_first_frame_s": ttff, "prompt_tokens": int(prompt.shape[1]),
            "compile": compile_, "source": str(src)}


def prompt_ids(ckpt: Path) -> list[int]:
    """The request's prompt as the API builds it (no engine needed)."""
    from vllm.config import ModelConfig
    from vllm.model_executor.models.fish_speech_tts import build_fish_prompt

    return build_fish_prompt(ModelConfig(model=str(ckpt)), TEXT)[0]


def bench_vllm(ckpt: Path, frames: int, concurrencies: list[int], sampling: dict,
               semantic_only_head: bool | None, fuse_fast_loop: bool = False,
               async_scheduling: bool = True,
               torch_fast_loop: bool = False) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    overrides = {} if semantic_only_head is None else \
        {"semantic_only_head": semantic_only_head}
    if fuse_fast_loop:  # compiles the torch loop
        overrides["fuse_fast_loop"] = True
    if torch_fast_loop or fuse_fast_loop:
        overrides.update(fused_fast_block=False, fused_fast_sampler=False)
    llm = LLM(str(ckpt), dtype="bfloat16", max_model_len=4096,
              max_num_seqs=max(concurrencies), gpu_memory_utilization=0.6,
              hf_overrides=overrides or None, async_scheduling=async_scheduling)
    from vllm.model_executor.models.fish_speech_tts import build_fish_prompt

    model_config = llm.llm_engine.vllm_config.model_config
    ids, _ = build_fish_prompt(model_config, TEXT)
    prompt = TokensPrompt(prompt_token_ids=ids)

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True,
                              detokenize=False, **sampling)

    out = {"prompt_tokens": len(ids), "by_concurrency": {},
           "semantic_only_head": semantic_only_head,
           "fuse_fast_loop": fuse_fast_loop,
           "fused_kernels": not (torch_fast_loop or fuse_fast_loop),
           "async_scheduling": async_scheduling}
    for c in concurrencies:
        # warm-up at this batch size (captures its fast-loop CUDA graph)
        llm.generate([prompt] * c, params(4), use_tqdm=False)
        t0 = time.perf_counter()
        llm.generate([prompt] * c, params(1), use_tqdm=False)
        ttff = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = llm.generate([prompt] * c, params(frames), use_tqdm=False)
        dt = time.perf_counter() - t0
        n = sum(len(r.outputs[0].token_ids) for r in res)
        assert all(r.outputs[0].aux_token_ids.shape[0] == frames for r in res)
        out["by_concurrency"][str(c)] = {
            "frames": n, "seconds": dt, "frames_per_s": n / dt,
            "frames_per_s_per_request": n / dt / c,
            "time_to_first_frame_s": ttff}
    del llm
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/fish-s1-bench"))
    ap.add_argument("--size", choices=["s1-mini", "s2-pro", "tiny"],
                    default="s1-mini")
    ap.add_argument("--original-src", type=Path,
                    help="fish-speech checkout at 3dd1f85 (the S2 original; "
                    "--size s2-pro)")
    ap.add_argument("--fuse-fast-loop", action="store_true",
                    help="vLLM: hf_overrides fuse_fast_loop (torch.compile "
                    "of the codebook loop before CUDA-graph capture)")
    ap.add_argument("--torch-fast-loop", action="store_true",
                    help="vLLM: hf_overrides fused_fast_block/fused_fast_sampler "
                         "false (the torch fast loop instead of the default fused "
                         "kernels: vLLM's CUDA ops, Triton attention and sampler)")
    ap.add_argument("--no-async-scheduling", action="store_true",
                    help="vLLM: schedule synchronously (async is the default)")
    ap.add_argument("--frames", type=int, default=256)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--compile", action="store_true",
                    help="also time the original with torch.compile")
    ap.add_argument("--skip-original", action="store_true")
    ap.add_argument("--skip-original-eager", action="store_true",
                    help="time only the original's torch.compile path")
    ap.add_argument("--semantic-only-head", choices=["default", "on", "off"],
                    default="default")
    a = ap.parse_args()
    s2 = a.size == "s2-pro"
    if s2 and not (a.skip_original or a.original_src):
        ap.error("--size s2-pro needs --original-src (or --skip-original)")
    # S2: the family's own sampling (top-k 30, top-p 0.9, no repetition
    # penalty); 1.5/S1: top-p 0.8 and a repetition penalty over the window
    sampling = (dict(temperature=0.8, top_p=0.9, top_k=30) if s2 else
                dict(temperature=0.8, top_p=0.8, repetition_penalty=1.1))
    make_checkpoint(a.ckpt, a.size)
    result: dict = {"device": torch.cuda.get_device_name(), "size": a.size,
                    "frames": a.frames, "sampling": sampling}
    cfg = json.loads((a.ckpt / "config.json").read_text())
    if s2:
        result["roofline"] = roofline(
            {**S2_PRO, "num_codebooks": cfg["audio_decoder_config"]["num_codebooks"]},
            cfg["text_config"]["vocab_size"],
            cfg["audio_decoder_config"]["vocab_size"])
    else:
        result["roofline"] = roofline(cfg, cfg["vocab_size"], cfg["codebook_size"])
    if not a.skip_original:
        modes = (([] if a.skip_original_eager else [False])
                 + ([True] if a.compile else []))
        for compile_ in modes:
            key = "original_compiled" if compile_ else "original"
            if s2:
                result[key] = bench_original_s2(a.original_src, a.ckpt, a.frames,
                                                compile_, sampling, prompt_ids(a.ckpt))
            else:
                result[key] = bench_original(a.ckpt, a.frames, compile_, sampling)
            a.out.write_text(json.dumps(result, indent=2))  # partial results
    soh = {"default": None, "on": True, "off": False}[a.semantic_only_head]
    result["vllm"] = bench_vllm(a.ckpt, a.frames, a.concurrency, sampling, soh,
                                a.fuse_fast_loop, not a.no_async_scheduling,
                                a.torch_fast_loop)
    origs = [result[k] for k in ("original", "original_compiled") if k in result]
    if origs:
        best = max(origs, key=lambda r: r["frames_per_s"])
        base = best["frames_per_s"]
        base_ttff = min(r["time_to_first_frame_s"] for r in origs)
        result["ratios_vs_original"] = {
            c: {"frames_per_s": r["frames_per_s"] / base,
                "time_to_first_frame": base_ttff / r["time_to_first_frame_s"]}
            for c, r in result["vllm"]["by_concurrency"].items()}
    a.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    main()
