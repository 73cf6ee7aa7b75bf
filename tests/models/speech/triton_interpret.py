# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Jit a vLLM Triton kernel for Triton's interpreter (``TRITON_INTERPRET=1``).

vLLM disables Triton on a machine without a GPU driver: its ``triton.jit``
is then a no-op decorator and ``tl`` a placeholder. ``rejit`` jits the same
function with the real ``triton.language``, which the interpreter runs on
CPU tensors. Used by the ``*_cases.py`` scripts, in a child process started
with ``TRITON_INTERPRET=1`` set before triton is imported.
"""

import os
import types

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def rejit(raw, **scope):
    """``raw`` (a vLLM-jitted function or its Python function) jitted with
    the real triton; ``scope`` replaces globals (e.g. re-jitted helpers)."""
    raw = getattr(raw, "fn", raw)
    glb = dict(raw.__globals__, tl=tl, triton=triton, **scope)
    fn = types.FunctionType(raw.__code__, glb, raw.__name__)
    fn.__annotations__ = {
        k: tl.constexpr if k.isupper() else v for k, v in raw.__annotations__.items()
    }
    fn.__module__ = raw.__module__
    return triton.jit(fn)
