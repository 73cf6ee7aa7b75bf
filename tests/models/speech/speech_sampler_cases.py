# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Cases of test_speech_sampler.py, run under ``TRITON_INTERPRET=1``.

``python speech_sampler_cases.py OUT.pt``: the fused kernel (Triton's
interpreter, on the CPU) and the torch reference of fish_speech.py on the
same logits and noise; saves {case: {name: tensor}}.
"""

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402
from triton_interpret import rejit  # noqa: E402

import vllm.model_executor.models.fish_speech as fish  # noqa: E402
from vllm.model_executor.layers import speech_sampler  # noqa: E402


def _kernel():
    return rejit(speech_sampler._sample_rows)


def _params(rows, gen):
    temperature = torch.rand(rows, generator=gen) * 1.4 + 0.05
    top_p = torch.rand(rows, generator=gen) * 0.98 + 0.01
    greedy = torch.rand(rows, generator=gen) < 0.2
    temperature[greedy] = 0.0
    penalty = 1.0 + torch.rand(rows, generator=gen)
    return greedy, temperature, top_p, penalty


def _with_noise(noise, fn, *args):
    """The reference with the kernel's noise and a stable sort: ties in the
    top-p prefix in index order, as the CUDA sort of rows longer than 32
    orders them (the CPU sort does not)."""
    saved, sort = fish._exp_noise, torch.sort
    fish._exp_noise = lambda like, generators: noise
    torch.sort = lambda *a, **kw: sort(*a, **kw, stable=True)
    try:
        return fn(*args)
    finally:
        fish._exp_noise, torch.sort = saved, sort


def main(out):
    k = _kernel()
    results = {}
    # bf16-rounded logits have many ties: their order decides the top-p prefix
    for vocab, bf16 in [(1024, True), (300, False), (300, True)]:
        gen = torch.Generator().manual_seed(vocab + bf16)
        rows = 8
        logits = torch.randn(rows, vocab, generator=gen) * 1.5
        if bf16:
            logits = logits.to(torch.bfloat16).float()
        greedy, temperature, top_p, penalty = _params(rows, gen)
        prev = torch.randint(0, vocab, (rows, 16), generator=gen)
        prev[:, 8:] = prev[:, :8]  # repeated ids are penalised once
        noise = torch.empty(rows, vocab).exponential_(1, generator=gen)
        want = _with_noise(
            noise,
            fish._fish_sample,
            logits,
            greedy,
            temperature,
            top_p,
            penalty,
            prev,
            {},
            False,
        )
        got, other = (
            speech_sampler.fused_sample(
                logits,
                greedy,
                temperature,
                top_p,
                q,
                penalty=penalty,
                prev=prev,
                kernel=k,
            )
            for q in (noise, noise.flip(-1).contiguous())
        )
        name = f"fish-{vocab}-{'bf16' if bf16 else 'fp32'}"
        results[name] = dict(want=want, got=got, other=other, greedy=greedy)

    gen = torch.Generator().manual_seed(7)
    rows, vocab = 8, 512
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(torch.bfloat16).float()
    greedy, temperature, top_p, _ = _params(rows, gen)
    top_k = torch.randint(1, 80, (rows,), generator=gen)
    top_k[:2] = vocab  # top-k off
    noise = torch.empty(rows, vocab).exponential_(1, generator=gen)
    want = _with_noise(
        noise,
        fish._s2_sample,
        logits,
        greedy,
        temperature,
        top_p,
        top_k,
        {},
        False,
    )
    got = speech_sampler.fused_sample(
        logits, greedy, temperature, top_p, noise, top_k=top_k, kernel=k
    )
    results["s2-512-bf16"] = dict(want=want, got=got)

    gen = torch.Generator().manual_seed(3)
    full = torch.randn(5, 700, generator=gen)
    logits = full[:, :600]  # a column slice, as the loop's [:, :lim]
    prev = torch.randint(0, 600, (5, 4), generator=gen)
    penalty = torch.full((5,), 1.3)
    want = fish._fish_penalize(logits, penalty, prev).argmax(-1)
    ones = torch.ones(5)
    greedy_got = speech_sampler.fused_sample(
        logits,
        torch.ones(5, dtype=torch.bool),
        ones,
        ones,
        torch.ones(5, 600),
        penalty=penalty,
        prev=prev,
        all_greedy=True,
        kernel=k,
    )
    # top-p that keeps only the top token: every row draws the argmax
    tiny_top_p_got = speech_sampler.fused_sample(
        logits,
        torch.zeros(5, dtype=torch.bool),
        ones,
        torch.full((5,), 1e-6),
        torch.empty(5, 600).exponential_(1, generator=gen),
        penalty=penalty,
        prev=prev,
        kernel=k,
    )
    results["strided"] = dict(
        want=want, greedy_got=greedy_got, tiny_top_p_got=tiny_top_p_got
    )
    torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
