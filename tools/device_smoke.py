#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""GPU smoke check of the patched vLLM (run on the lent GPU machine).

After `python setup.py device-overlay --site /tmp/devsite` (and optionally
`python setup.py build-kernels`), checks that the imported vLLM is the patched
one, that the speech kernels (if compiled) match their torch reference, and
that a tiny model generates on the GPU through the patched engine.

    PYTHONPATH=/tmp/devsite python tools/device_smoke.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/smoke"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    import torch

    import importlib.util
    spec = importlib.util.spec_from_file_location("vllm_speech_build", ROOT / "setup.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    import vllm
    from vllm import _speech_build_info as info

    report: dict = {"vllm": vllm.__version__, "vllm_file": vllm.__file__,
                    "patch_digest": info.PATCH_SET_DIGEST,
                    "expected_digest": build.patch_set_digest(),
                    "gpu": torch.cuda.get_device_name()}
    assert info.PATCH_SET_DIGEST == build.patch_set_digest(), report

    from vllm.model_executor.layers.codebook_embedding import (
        codebook_embedding_sum, codebook_embedding_sum_ref, speech_ops_available)
    report["speech_ops"] = speech_ops_available()
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(10 * 4096, 1024, device="cuda", dtype=dtype)
        codes = torch.randint(0, 4096, (64, 10), device="cuda")
        got = codebook_embedding_sum(codes, w, 4096)
        ref = codebook_embedding_sum_ref(codes, w, 4096)
        err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        report[f"codebook_sum_max_rel_err_{dtype}"] = err
        assert err < (1e-6 if dtype == torch.float32 else 1e-2), err

    from make_demo_checkpoint import make_checkpoint
    from vllm import LLM, SamplingParams
    ckpt = make_checkpoint(Path("/tmp/qwen2-tiny"))
    t0 = time.monotonic()
    llm = LLM(model=str(ckpt), dtype="bfloat16", enforce_eager=True,
              max_model_len=512, gpu_memory_utilization=0.3)
    report["engine_start_s"] = round(time.monotonic() - t0, 1)
    outs = llm.generate(["The quick brown fox"] * 8,
                        SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    report["generated_tokens"] = [len(o.outputs[0].token_ids) for o in outs]
    assert all(n == 64 for n in report["generated_tokens"])
    report["same_greedy_output"] = len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    (a.out / "device_smoke.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
