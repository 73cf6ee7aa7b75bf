# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Run a ``*_cases.py`` script under Triton's interpreter and load its results.

``TRITON_INTERPRET=1`` has to be set before triton is imported, so the
interpreted kernels run in one child process that saves its tensors to a
file. Shared by test_speech_sampler.py and test_speech_fast_attention.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch


def run_interpreted_cases(script: Path, out: Path, timeout: float = 600) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(script), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out)
