"""Registers, spills and shared memory of the attention kernels' autotune configs on sm_90.

No GPU needed: every config of the Triton attention kernels is compiled ahead of time for
an H100 (``sm_90a``) with Triton's own frontend and the ``ptxas`` Triton bundles for
Hopper and newer (``triton/backends/nvidia/bin/ptxas-blackwell``; the older bundled
``ptxas`` rejects Triton 3.9's PTX). The arguments are specialised as a real launch
specialises them (16-byte aligned pointers, unit head-dim strides as constants, the other
strides and the lengths divisible by 16), at B=2, H=24, S=4608 by default, so the code is
the code a launch at that size would run.

Per kernel, dtype, head dim and tile ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` it
records what ptxas reports (registers per thread, bytes of spill stores and loads, stack
frame), Triton's shared memory per program, whether that fits an H100's 227 KiB per block,
and how many programs one SM can then hold (from registers, shared memory and warps).
Kernels: the forward of :mod:`mfcore.kernels.flash_jvp` in its three modes
(``primal``: output and logsumexp; ``fused``: primal and tangent in one pass, all three
input tangents present; ``tangent``: tangent only, from a saved logsumexp) and the dK/dV
and dQ kernels of :mod:`mfcore.kernels.flash_bwd`. These are compile-time resource counts,
not timings: spills and a shared-memory overflow are what they can rule out.

Prints a markdown table and writes ``benchmarks/results/kernel_resources.json``.

Usage::

    python benchmarks/kernel_resources.py                       # everything (~25 min, 1 core)
    python benchmarks/kernel_resources.py --kernels fused --dtypes bf16 --head-dims 128
    python benchmarks/kernel_resources.py --kernels fused --shapes 128,32,8,2 64,64,4,3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import platform
import re
import sys
import warnings
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from mfcore.kernels import flash_bwd, flash_jvp

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNELS = ("primal", "fused", "tangent", "dkdv", "dq")
# H100 (sm_90) per-SM limits: shared memory one block may use, shared memory per SM (1 KiB
# of it reserved per block), registers (allocated per warp in units of 256), warps.
SMEM_LIMIT = 227 * 1024
SM_SMEM, SM_REGS, SM_WARPS = 228 * 1024, 64 * 1024, 64
RESULTS = Path(__file__).resolve().parent / "results" / "kernel_resources.json"
_PTXAS_LINES = {
    "regs": r"Used (\d+) registers",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "stack": r"(\d+) bytes stack frame",
}


def default_shapes(kernel: str) -> tuple[tuple[int, int, int, int], ...]:
    """The autotune tile list the library uses for ``kernel``."""
    if kernel in flash_jvp._SHAPES:
        return flash_jvp._SHAPES[kernel]
    return flash_bwd._DKDV_SHAPES if kernel == "dkdv" else flash_bwd._DQ_SHAPES


def _forward_inputs(kernel: str, qkv: tuple, lse: torch.Tensor, keep) -> tuple[tuple, dict]:
    q, k, v = qkv
    tangent = kernel != "primal"
    tangents = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    outputs = (torch.empty_like(q), torch.empty_like(q) if tangent else None, lse)
    return flash_jvp._kernel_inputs(
        qkv, tangents if tangent else (None, None, None), outputs, key_mask=keep, scale=0.1,
        primal=kernel != "tangent",
    )  # fmt: skip


def _backward_inputs(kernel: str, qkv: tuple, lse: torch.Tensor, keep) -> tuple[tuple, dict]:
    """Mirrors the argument order of ``flash_bwd.attention_backward``."""
    q, k, v = qkv
    grad_o = torch.empty_like(q)
    mask = keep.to(torch.int8) if keep is not None else lse
    mask_strides = (mask.stride(0), mask.stride(1)) if keep is not None else (0, 0)
    inputs = (q, k, v, grad_o, lse, torch.empty_like(lse), mask)
    outputs = (torch.empty_like(k), torch.empty_like(v)) if kernel == "dkdv" else (q,)
    sizes = (
        *q.stride(), *k.stride(), *v.stride(), *grad_o.stride(), *mask_strides,
        q.shape[1], q.shape[2], k.shape[2], q.shape[3], 0.1,
    )  # fmt: skip
    flags = dict(
        HAS_MASK=keep is not None, BLOCK_D=max(16, triton.next_power_of_2(q.shape[3])),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", UPCAST=False,
    )  # fmt: skip
    return (*inputs, *outputs, *sizes), flags


def kernel_inputs(kernel: str, dtype: torch.dtype, head_dim: int, size: tuple, mask: bool):
    """The JIT function, its arguments (meta tensors) and flags for one kernel."""
    batch, heads, seq = size
    qkv = tuple(torch.empty(batch, heads, seq, head_dim, dtype=dtype, device="meta") for _ in "qkv")
    lse = torch.empty(batch, heads, seq, dtype=torch.float32, device="meta")
    keep = torch.empty(batch, seq, dtype=torch.bool, device="meta") if mask else None
    if kernel in ("dkdv", "dq"):
        fn = flash_bwd._dkdv_kernel if kernel == "dkdv" else flash_bwd._dq_kernel
        return (fn, *_backward_inputs(kernel, qkv, lse, keep))
    return (flash_jvp._attn_jvp_kernel, *_forward_inputs(kernel, qkv, lse, keep))


def compile_resources(fn, args: tuple, flags: dict, shape: tuple, arch: int) -> dict:
    """Compile ``fn`` for ``sm_<arch>`` as a launch would; ptxas's counts and shared memory."""
    block_m, block_n, num_warps, num_stages = shape
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
                  num_stages=num_stages)  # fmt: skip
    if "EVEN_N" in fn.arg_names:  # set per tile by a heuristic at launch (flash_jvp._even_n)
        named = dict(zip(fn.arg_names[: len(args)], args, strict=True))
        kwargs["EVEN_N"] = flash_jvp._even_n(named | kwargs)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # ptxas's -v report, printed by Triton
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
        )
    found = {k: re.findall(p, log.getvalue()) for k, p in _PTXAS_LINES.items()}
    if not found["regs"]:
        raise RuntimeError(f"no ptxas report in Triton's output:\n{log.getvalue()}")
    out = {k: int(v[-1]) if v else 0 for k, v in found.items()}
    out["smem"] = int(compiled.metadata.shared)
    out["smem_fits"] = out["smem"] <= SMEM_LIMIT
    out["blocks_per_sm"] = blocks_per_sm(out["regs"], out["smem"], num_warps)
    return out


def blocks_per_sm(regs: int, smem: int, num_warps: int) -> int:
    """Programs one H100 SM can hold at once, from registers, shared memory and warps."""
    if smem > SMEM_LIMIT:
        return 0
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = SM_REGS // (regs_per_warp * num_warps)
    by_smem = SM_SMEM // (smem + 1024)
    return min(by_regs, by_smem, SM_WARPS // num_warps)


def _child(conn, fn, args: tuple, flags: dict, shape: tuple, arch: int) -> None:
    try:
        conn.send(compile_resources(fn, args, flags, shape, arch))
    except Exception as exc:  # noqa: BLE001  (reported to the parent, recorded in the table)
        conn.send({"error": f"{type(exc).__name__}: {exc}".splitlines()[0]})


def measure(fn, args: tuple, flags: dict, shape: tuple, arch: int) -> dict:
    """:func:`compile_resources` in a forked process: an abort inside the compiler (LLVM
    assertions do that) is recorded as an error instead of ending the sweep."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args, flags, shape, arch))
    proc.start()
    send.close()
    try:
        out = receive.recv()
    except EOFError:
        out = None
    proc.join()
    return out if out is not None else {"error": f"compiler crashed (exit code {proc.exitcode})"}


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(x) for x in text.split(","))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"a shape is BLOCK_M,BLOCK_N,warps,stages, got {text!r}")
    return parts  # type: ignore[return-value]


def _table(rows: list[dict]) -> str:
    lines = [
        "| kernel | dtype | D | BLOCK_M | BLOCK_N | warps | stages | regs | spill st/ld (B) "
        "| smem (KiB) | blocks/SM |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['kernel']} | {r['dtype']} | {r['head_dim']} | " + " | ".join(
            str(x) for x in r["shape"]
        )
        if "error" in r:
            lines.append(f"{head} | error: {r['error'][:60]} | | | |")
            continue
        smem = f"{r['smem'] / 1024:.0f}" + ("" if r["smem_fits"] else " (too big)")
        spill = f"{r['spill_stores']}/{r['spill_loads']}"
        lines.append(f"{head} | {r['regs']} | {spill} | {smem} | {r['blocks_per_sm']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, default=None,
                        help="tiles to try instead of the library's lists")  # fmt: skip
    parser.add_argument("--size", nargs=3, type=int, default=[2, 24, 4608], help="B H S")
    parser.add_argument("--mask", action="store_true", help="compile with a key-padding mask")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # launches' default
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
    knobs.nvidia.dump_ptxas_log = True
    rows = []
    for kernel in args.kernels:
        for dtype in args.dtypes:
            for head_dim in args.head_dims:
                fn, kargs, flags = kernel_inputs(
                    kernel, DTYPES[dtype], head_dim, tuple(args.size), args.mask
                )
                for shape in args.shapes or default_shapes(kernel):
                    row = dict(kernel=kernel, dtype=dtype, head_dim=head_dim, shape=list(shape))
                    row |= measure(fn, kargs, flags, shape, args.arch)
                    rows.append(row)
                    print(_table([row]).splitlines()[-1], file=sys.stderr, flush=True)
    meta = dict(
        arch=f"sm_{args.arch}a", size=args.size, mask=args.mask, smem_limit=SMEM_LIMIT,
        triton=triton.__version__, torch=torch.__version__, python=platform.python_version(),
        ptxas=get_ptxas(args.arch).version, command="python " + " ".join(sys.argv),
        note="compile-time resource counts from ptxas -v; not timings; no GPU involved",
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    print(_table(rows))


if __name__ == "__main__":
    main()
