"""What the forward/tangent (:mod:`mfcore.kernels.flash_jvp`) and the backward
(:mod:`mfcore.kernels.flash_bwd`) Triton kernels share: the log2 units of their scores, the
matmul with fp32 accumulation, the autotuner's configs and the interpreter's one tile."""

from __future__ import annotations

import os

import triton
import triton.language as tl

__all__ = ["LOG2E", "dot", "tile_configs", "interpreting", "interpreter_block"]

#: ``log2(e)``: the kernels handle scores in log2 units, so they can use exp2/log2.
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with fp32 accumulation; ``UPCAST`` computes it from fp32 copies (used under
    the interpreter, whose bf16 dot multiplies raw bit patterns: triton-lang/triton#11584)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


def tile_configs(shapes: tuple[tuple[int, int, int, int], ...]) -> list[triton.Config]:
    """Autotuner configs from ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` tile shapes."""
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in shapes
    ]


def interpreting() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET``; the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def interpreter_block(seq_q: int, seq_k: int) -> int:
    """The one small tile used under the interpreter (no autotuning there: tests stay fast)."""
    return 16 if max(seq_q, seq_k) <= 16 else 32
