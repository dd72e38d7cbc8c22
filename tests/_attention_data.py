"""Attention test data and the float64 reference, shared by the Triton test files.

No triton import here: the interpreted cases must import triton only after
``TRITON_INTERPRET=1`` is set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from mfcore.attention_reference import ScoreSpec, reference_forward


def _data(b, h, s_q, s_k, d, dtype, *, seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s_q, d, generator=g)
    k = torch.randn(b, h, s_k, d, generator=g)
    v = torch.randn(b, h, s_k, d, generator=g)
    tangents = tuple(torch.randn(x.shape, generator=g) for x in (q, k, v))
    keep = None
    if masked:
        keep = torch.rand(b, s_k, generator=g) > 0.3
        keep[:, 0] = True
        if b > 1:
            keep[-1] = False  # one sequence with every key masked
    return tuple(x.to(dtype) for x in (q, k, v)), tuple(t.to(dtype) for t in tangents), keep


def _exact(primals, tangents, keep, scale):
    """float64 reference: output, logsumexp, tangent."""
    p64 = tuple(x.double() for x in primals)
    t64 = tuple(None if t is None else t.double() for t in tangents)
    kind = "none" if keep is None else "keys"
    return reference_forward(*p64, t64, ScoreSpec(kind, keep, scale))


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def run_interpreted(cases: Path) -> None:
    """Run the pytest file ``cases`` in a fresh process with ``TRITON_INTERPRET=1`` (Triton
    fixes interpreted vs compiled at its first import) and fail with its output if it fails
    or skips."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", str(cases), "-q", "-x", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]
