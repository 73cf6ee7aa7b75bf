# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The Fish Speech fast (codebook) loop as one CUDA graph per batch bucket.

Every engine step, the dual-AR model runs its fast transformer over
``num_codebooks`` positions and samples ``num_codebooks - 1`` residual codes:
about 40 small kernels per position and layer plus the sampling, several
hundred launches per step, which dominate a decode step at small batch.
``FastLoopGraphs`` captures the whole loop (fast layers, head, repetition
penalty, top-p, temperature, the exponential-race draw and the embedding of
each sampled code) once per padded batch size and replays it; with
``compile=True`` (opt-in: ``hf_overrides={"fuse_fast_loop": true}``) the loop
is first fused by ``torch.compile``.

The captured function must be free of host synchronisation and of
data-dependent Python branches; random draws use the default CUDA generator
(graph-safe). Steps with per-request seeded generators, ``enforce_eager`` and
CPU runs use the eager loop, which is the reference path:
``tests/models/speech/test_fish_speech_gpu.py`` compares the two on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vllm.logger import init_logger

logger = init_logger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class FastLoopGraphs:
    """CUDA graphs of ``fn(*inputs) -> Tensor`` keyed by padded batch size.

    ``fn`` takes tensors whose first dimension is the batch and returns one
    tensor with the batch first. Inputs are copied into static buffers
    (padding rows are zero-filled), the bucket's graph is replayed and the
    first ``n`` rows of its output are returned (cloned).
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        compile: bool = False,
    ) -> None:
        # torch.compile (inductor) fuses the loop's many small kernels before
        # capture; the batch dimension is dynamic, so buckets share the code.
        self.fn = torch.compile(fn, dynamic=True, fullgraph=True) if compile else fn
        self.buckets = tuple(sorted(buckets))
        self.graphs: dict[
            int, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]
        ] = {}
        self.pool = None

    def bucket(self, n: int) -> int | None:
        for b in self.buckets:
            if b >= n:
                return b
        return None

    def _capture(self, size: int, inputs: Sequence[torch.Tensor]):
        static = [
            torch.zeros((size, *t.shape[1:]), dtype=t.dtype, device=t.device)
            for t in inputs
        ]
        for s, t in zip(static, inputs):
            s[: t.shape[0]].copy_(t)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up (lazy inits, cuBLAS workspaces)
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(*static)
        logger.debug("captured the Fish fast loop for batch %d", size)
        self.graphs[size] = (graph, static, out)
        return self.graphs[size]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | None:
        """The loop's output, or None when ``n`` exceeds the largest bucket
        (the caller then runs ``fn`` eagerly)."""
        n = inputs[0].shape[0]
        size = self.bucket(n)
        if size is None:
            return None
        entry = self.graphs.get(size)
        if entry is None:
            entry = self._capture(size, inputs)
        graph, static, out = entry
        for s, t in zip(static, inputs):
            s[:n].copy_(t)
            if n < size:
                s[n:].zero_()
        graph.replay()
        return out[:n].clone()
