# SPDX-License-Identifier: Apache-2.0
"""CosyVoice2 token2wav (flow + HiFT) speed at release dims, random weights.

Offline RTF for a few utterance lengths and streaming chunk latency (first
chunk, later chunks) on one device; ``--batches 1,4,16``: concurrent
streaming sessions decoded together (``push_streams``), audio seconds per
wall second, fp32 and with TF32 matmuls/convs; ``--model cosyvoice3`` for
the DiT flow + causal HiFT. Usage:

    python benchmarks/bench_cosyvoice_token2wav.py [--device cuda] [--batches 1,4,16]
"""

import argparse
import json
import time

import torch

from vllm.model_executor.models.cosyvoice_flow import CausalMaskedDiffWithXvec
from vllm.model_executor.models.cosyvoice_hift import HiFTGenerator
from vllm.model_executor.models.cosyvoice3_flow import CausalMaskedDiffWithDiT
from vllm.model_executor.models.cosyvoice_hift import CausalHiFTGenerator
from vllm.model_executor.models.cosyvoice_token2wav import (
    CosyVoice2Token2Wav,
    CosyVoice3Token2Wav,
    push_streams,
)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seconds", default="5,10,20")
    ap.add_argument("--prompt-tokens", type=int, default=75)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", choices=("cosyvoice2", "cosyvoice3"),
                    default="cosyvoice2")
    ap.add_argument("--batches", default="",
                    help="e.g. 1,4,16: batched streaming sessions only")
    ap.add_argument("--stream-tokens", type=int, default=250)
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    cv3 = args.model == "cosyvoice3"
    flow = CausalMaskedDiffWithDiT() if cv3 else CausalMaskedDiffWithXvec()
    hift = CausalHiFTGenerator() if cv3 else HiFTGenerator()
    with torch.no_grad():
        for p in list(flow.parameters()) + list(hift.parameters()):
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / p[0].numel() ** 0.5)
    if not cv3:  # the causal HiFT folds its weight norm when loaded
        hift.fold_weight_norm()
    cls = CosyVoice3Token2Wav if cv3 else CosyVoice2Token2Wav
    model = cls(flow.eval(), hift.eval()).to(dev).eval()
    if args.batches:
        print(json.dumps(batched_streams(model, dev, args), indent=1))
        return

    g = torch.Generator().manual_seed(0)
    p = args.prompt_tokens
    prompt_token = torch.randint(0, 6561, (1, p), generator=g)
    prompt_feat = torch.randn(1, 2 * p, 80, generator=g).to(dev)
    emb = torch.randn(1, 192, generator=g).to(dev)
    results: dict = {
        "device": str(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else "cpu",
        "prompt_tokens": p,
        "offline": [],
        "stream": {},
    }

    # warm-up
    tok = torch.randint(0, 6561, (1, 50), generator=g)
    model.synthesize(tok, prompt_token, prompt_feat, emb)
    _sync(dev)

    for sec in [float(s) for s in args.seconds.split(",")]:
        n = int(sec * 25)
        tok = torch.randint(0, 6561, (1, n), generator=g)
        times = []
        for _ in range(args.repeats):
            _sync(dev)
            t0 = time.perf_counter()
            wav = model.synthesize(tok, prompt_token, prompt_feat, emb)
            _sync(dev)
            times.append(time.perf_counter() - t0)
        audio_s = wav.shape[1] / model.sample_rate
        best = min(times)
        results["offline"].append(
            {"audio_s": audio_s, "wall_s": best, "rtf": best / audio_s}
        )

    # streaming: all tokens known, chunk latencies as the original's loop
    n = 250
    tok = torch.randint(0, 6561, (1, n), generator=g).tolist()[0]
    sess = model.stream(prompt_token, prompt_feat, emb)
    lat = []
    need = sess._hop() + model.pre_lookahead_len
    _sync(dev)
    t0 = time.perf_counter()
    chunks = sess.push(tok[:need])
    _sync(dev)
    lat.append(time.perf_counter() - t0)
    pos = need
    while pos < n:
        step = min(model.token_hop_len, n - pos)
        t0 = time.perf_counter()
        out = sess.push(tok[pos : pos + step])
        _sync(dev)
        if out:
            lat.append(time.perf_counter() - t0)
        chunks += out
        pos += step
    t0 = time.perf_counter()
    chunks += sess.finish()
    _sync(dev)
    lat.append(time.perf_counter() - t0)
    results["stream"] = {
        "tokens": n,
        "chunks": len(chunks),
        "first_chunk_s": lat[0],
        "chunk_latencies_s": lat,
    }
    print(json.dumps(results, indent=1))


def batched_streams(model, dev: torch.device, args) -> dict:
    """B sessions (same prompt length) streaming ``--stream-tokens`` tokens
    each, pushed a hop at a time to all of them together."""
    g = torch.Generator().manual_seed(1)
    p, n = args.prompt_tokens, args.stream_tokens
    out: dict = {"model": args.model, "prompt_tokens": p, "tokens": n,
                 "device": torch.cuda.get_device_name(dev)
                 if dev.type == "cuda" else "cpu", "runs": []}

    def run(b: int) -> float:
        sessions = [
            model.stream(
                torch.randint(0, 6561, (1, p), generator=g),
                torch.randn(1, 2 * p, 80, generator=g).to(dev),
                torch.randn(1, 192, generator=g).to(dev),
            )
            for _ in range(b)
        ]
        toks = [torch.randint(0, 6561, (n,), generator=g).tolist() for _ in range(b)]
        _sync(dev)
        t0 = time.perf_counter()
        for i in range(0, n, model.token_hop_len):
            push_streams(sessions, [t[i : i + model.token_hop_len] for t in toks],
                         [False] * b)
        push_streams(sessions, [[]] * b, [True] * b)
        _sync(dev)
        return time.perf_counter() - t0

    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        run(1)  # warm-up
        for b in [int(x) for x in args.batches.split(",")]:
            wall = run(b)
            audio = b * n / 25
            out["runs"].append({"tf32": tf32, "sessions": b, "wall_s": round(wall, 3),
                                "audio_s_per_s": round(audio / wall, 2)})
            print(out["runs"][-1], flush=True)
    return out


if __name__ == "__main__":
    main()
