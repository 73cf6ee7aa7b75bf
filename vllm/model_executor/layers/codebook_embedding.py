# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Summed embeddings of multi-codebook audio frames.

Models with residual audio codebooks (e.g. Fish Speech) feed a generated frame
back as ``sum_k E[codes[:, k] + k * codebook_size]`` over one stacked
embedding table. On CUDA this is one launch of ``_speech_C`` (built from
csrc/speech by vLLM's CMake, or by ``python setup.py build-kernels``); the
torch path below is the reference and the fallback everywhere else.
"""

import torch

from vllm.logger import init_logger

logger = init_logger(__name__)

_speech_ops_loaded: bool | None = None


def speech_ops_available() -> bool:
    """Whether the compiled ``_speech_C`` extension is importable."""
    global _speech_ops_loaded
    if _speech_ops_loaded is None:
        try:
            import vllm._speech_C  # noqa: F401

            _speech_ops_loaded = hasattr(torch.ops._speech_C, "codebook_embedding_sum")
        except ImportError:
            _speech_ops_loaded = False
    return _speech_ops_loaded


def codebook_embedding_sum_ref(
    codes: torch.Tensor, weight: torch.Tensor, codebook_size: int
) -> torch.Tensor:
    """Torch reference: ``codes`` [N, K] -> [N, H] (accumulated in fp32)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be [N, K], got shape {tuple(codes.shape)}")
    num_codebooks = codes.shape[1]
    if num_codebooks * codebook_size > weight.shape[0]:
        raise ValueError(
            f"{num_codebooks} codebooks of {codebook_size} entries exceed the "
            f"{weight.shape[0]} rows of the embedding table"
        )
    offsets = torch.arange(num_codebooks, device=codes.device) * codebook_size
    rows = torch.nn.functional.embedding(codes.long() + offsets, weight.float())
    return rows.sum(dim=1).to(weight.dtype)


def codebook_embedding_sum(
    codes: torch.Tensor, weight: torch.Tensor, codebook_size: int
) -> torch.Tensor:
    """``out[n] = sum_k weight[codes[n, k] + k * codebook_size]``."""
    if codes.is_cuda and speech_ops_available() and weight.is_contiguous():
        out = torch.empty(
            (codes.shape[0], weight.shape[1]), dtype=weight.dtype, device=weight.device
        )
        torch.ops._speech_C.codebook_embedding_sum(out, codes, weight, codebook_size)
        return out
    return codebook_embedding_sum_ref(codes, weight, codebook_size)
