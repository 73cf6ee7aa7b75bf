# SPDX-License-Identifier: Apache-2.0
"""CosyVoice2 token2wav (flow + HiFT) speed at release dims, random weights.

Offline RTF for a few utterance lengths and streaming chunk latency (first
chunk, later chunks) on one device. Usage:

    python benchmarks/bench_cosyvoice_token2wav.py [--device cuda] [--dtype fp32]
"""

import argparse
import json
import time

import torch

from vllm.model_executor.models.cosyvoice_flow import CausalMaskedDiffWithXvec
from vllm.model_executor.models.cosyvoice_hift import HiFTGenerator
from vllm.model_executor.models.cosyvoice_token2wav import CosyVoice2Token2Wav


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seconds", default="5,10,20")
    ap.add_argument("--prompt-tokens", type=int, default=75)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    flow = CausalMaskedDiffWithXvec()
    hift = HiFTGenerator()
    with torch.no_grad():
        for p in list(flow.parameters()) + list(hift.parameters()):
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / p[0].numel() ** 0.5)
    hift.fold_weight_norm()
    model = CosyVoice2Token2Wav(flow.eval(), hift.eval()).to(dev).eval()

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


if __name__ == "__main__":
    main()
