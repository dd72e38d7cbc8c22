"""Time and peak memory of attention primal + tangent (JVP), and of the backward.

Methods, each at B=2, H=24, D=128, bf16 and S in {1536, 4608} by default:

- ``flash_forward``: flash SDPA forward, no grad (the unit every time is divided by);
- ``mfcore_fused``: ``torch.func.jvp`` of :func:`mfcore.attention.attention` (Triton, primal
  and tangent in one pass);
- ``mfcore_from_lse``: the same with the fused dual call off (forward kernel, then the
  tangent-only kernel from the saved logsumexp), i.e. what a ``jvp`` rule alone gives;
- ``math_sdpa_jvp``: ``torch.func.jvp`` of SDPA on the math backend;
- ``explicit_tangent``: the tangent written out with the S x S matrices materialised;
- ``jvp_flash_attention``: the peer package (``pip install jvp-flash-attention==0.14.0``)
  under ``torch.func.jvp``, when importable;
- ``mfcore_backward`` / ``flash_backward``: the backward through the primal output alone
  (on CUDA ours is the Triton backward kernel of :mod:`mfcore.kernels.flash_bwd`; on CPU
  the reference), its gradients also checked against float64.

Each tangent and each backward's gradients are also compared with a float64 reference
(relative max error; for gradients the largest over q, k, v). Results go to
``benchmarks/results/attention_jvp_<device>.json``; the table is printed and, on CUDA,
written to the ``attention_jvp`` section of ``docs/benchmarks.md``. Needs
CUDA for the real numbers; on CPU it runs the reference path at tiny sizes as a smoke test.

Usage::

    python benchmarks/attention_jvp.py                 # CUDA, default sizes
    python benchmarks/attention_jvp.py --seq 1536 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _report import provenance, update_section  # benchmarks/ is on sys.path as the script's dir
from torch.nn.attention import SDPBackend, sdpa_kernel

import mfcore.attention as attn_mod
import mfcore.attention_reference as attn_ref
from mfcore.attention import attention

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(fn: Callable[[], object], device: torch.device, repeats: int) -> dict:
    """Median wall time (ms) over ``repeats`` after warm-up, and peak extra memory (GB)."""
    for _ in range(2):  # warm-up: autotuning, allocator
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        _sync(device)
        peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    return {"ms": statistics.median(times), "peak_gb": peak}


def _explicit(q, k, v, tq, tk, tv, scale):
    """Primal and tangent with the S x S scores materialised (softmax in fp32)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    p = torch.softmax(s.float(), dim=-1)
    ds = (torch.matmul(tq, k.transpose(-1, -2)) + torch.matmul(q, tk.transpose(-1, -2))) * scale
    pds = p * ds.float()
    o = torch.matmul(p.to(v.dtype), v)
    do = torch.matmul(pds.to(v.dtype), v) + torch.matmul(p.to(tv.dtype), tv)
    return o, do - pds.sum(-1, keepdim=True).to(o.dtype) * o


def _peer():
    """The peer kernel's attention function, or None."""
    try:
        from jvp_flash_attention.jvp_attention import attention as peer_attention
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return peer_attention


def _exact_tangent(q, k, v, tangents, scale):
    p64 = [x.double() for x in (q, k, v)]
    t64 = tuple(t.double() for t in tangents)
    return attn_ref.reference_forward(*p64, t64, "none", None, scale, None)[2]


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def _tangent_methods(on_cuda: bool, q, k, v, tangents, scale) -> dict[str, Callable]:
    """name -> function returning (primal, tangent)."""
    inputs = (q, k, v)

    def ours(fused: bool, backend: str):
        def run():
            attn_mod._FUSE_DUAL = fused
            try:
                return torch.func.jvp(
                    lambda a, b, c: attention(a, b, c, backend=backend), inputs, tangents
                )
            finally:
                attn_mod._FUSE_DUAL = True

        return run

    def math_jvp():
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(F.scaled_dot_product_attention, inputs, tangents)

    methods = {
        "math_sdpa_jvp": math_jvp,
        "explicit_tangent": lambda: _explicit(q, k, v, *tangents, scale),
    }
    backend = "triton" if on_cuda else "reference"
    methods = {
        f"mfcore_fused ({backend})": ours(True, backend),
        f"mfcore_from_lse ({backend})": ours(False, backend),
        **methods,
    }
    peer = _peer()
    if peer is not None and on_cuda:

        def peer_jvp():
            with sdpa_kernel(SDPBackend.MATH):
                return torch.func.jvp(peer, inputs, tangents)

        methods["jvp_flash_attention"] = peer_jvp
    return methods


def _backward_methods(on_cuda: bool, q, k, v, grad) -> dict[str, Callable]:
    """name -> function running the backward through a primal built outside the timing.

    ``torch.autograd.grad`` without ``create_graph`` runs the backward with grad mode off,
    so on the Triton path this is the Triton backward kernel.
    """
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    backend = "triton" if on_cuda else "reference"
    ours = attention(*leaves, backend=backend)
    sdpa_backend = SDPBackend.FLASH_ATTENTION if on_cuda else SDPBackend.MATH
    with sdpa_kernel(sdpa_backend):
        ref = F.scaled_dot_product_attention(*leaves)
    return {
        f"mfcore_backward ({backend})": lambda: torch.autograd.grad(
            ours, leaves, grad, retain_graph=True
        ),
        "flash_backward" if on_cuda else "math_backward": lambda: torch.autograd.grad(
            ref, leaves, grad, retain_graph=True
        ),
    }


def _exact_grads(q, k, v, grad, scale) -> tuple[torch.Tensor, ...]:
    p64 = [x.double() for x in (q, k, v)]
    out, lse, _ = attn_ref.reference_forward(*p64, None, "none", None, scale, None)
    return attn_ref.reference_backward(*p64, out, lse, grad.double(), "none", None, scale, None)


def _unit(q, k, v, on_cuda: bool) -> Callable:
    backend = SDPBackend.FLASH_ATTENTION if on_cuda else SDPBackend.MATH

    def run():
        with torch.no_grad(), sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def bench_size(seq: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """All methods at one sequence length."""
    on_cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype]
    g = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.heads, seq, args.dim)
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    tangents = tuple(torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    scale = 1 / math.sqrt(args.dim)
    unit = _measure(_unit(q, k, v, on_cuda), device, args.repeats)
    rows = [{"method": "flash_forward" if on_cuda else "math_forward", "seq": seq, **unit}]
    exact = _exact_tangent(q, k, v, tangents, scale) if args.check else None
    for name, fn in _tangent_methods(on_cuda, q, k, v, tangents, scale).items():
        row = {"method": name, "seq": seq}
        try:
            row |= _measure(fn, device, args.repeats)
            if exact is not None:
                row["tangent_rel_err"] = _rel(fn()[1], exact)
        except Exception as err:  # noqa: BLE001 - an OOM or a missing kernel is a result
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        if on_cuda:
            torch.cuda.empty_cache()
        rows.append(row)
    grad = torch.randn(shape, generator=g, device=device, dtype=dtype)
    exact_grads = _exact_grads(q, k, v, grad, scale) if args.check else None
    for name, fn in _backward_methods(on_cuda, q, k, v, grad).items():
        row = {"method": name, "seq": seq, **_measure(fn, device, args.repeats)}
        if exact_grads is not None:
            row["grad_rel_err"] = max(_rel(a, r) for a, r in zip(fn(), exact_grads, strict=True))
        rows.append(row)
    for row in rows:
        if "ms" in row:
            row["x_flash_forward"] = row["ms"] / unit["ms"]
    return rows


def _table(rows: list[dict]) -> str:
    lines = [
        "| S | method | time (ms) | x flash fwd | peak extra memory (GB) "
        "| rel. err (tangent or grads) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['seq']} | {r['method']} | {r['error']} | | | |")
            continue
        peak = "" if r.get("peak_gb") is None else f"{r['peak_gb']:.2f}"
        err = r.get("tangent_rel_err", r.get("grad_rel_err"))
        err = "" if err is None else f"{err:.1e}"
        lines.append(
            f"| {r['seq']} | {r['method']} | {r['ms']:.2f} | {r['x_flash_forward']:.1f} "
            f"| {peak} | {err} |"
        )
    return "\n".join(lines)


def _device_tag(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the float64 accuracy checks")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        print(
            "No CUDA device: the benchmark needs one (flash SDPA and the Triton kernel). "
            "Running the reference path at tiny sizes on CPU as a smoke test."
        )
        args.batch, args.heads, args.dim = 1, 2, 32
        args.seq = args.seq or [64, 192]
        args.repeats = min(args.repeats, 3)
    args.seq = args.seq or [1536, 4608]
    rows = [row for seq in args.seq for row in bench_size(seq, args, device)]
    out = args.out or RESULTS / f"attention_jvp_{_device_tag(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "batch": args.batch, "heads": args.heads, "dim": args.dim, "dtype": args.dtype,
        "repeats": args.repeats,
    }  # fmt: skip
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = _table(rows)
    print(table)
    print(f"\nwrote {out}")
    if device.type == "cuda":  # a CPU smoke run never overwrites the GPU numbers
        body = provenance(meta["device"]) + f" Median of {args.repeats}.\n\n" + table
        update_section("attention_jvp", "Attention JVP (`benchmarks/attention_jvp.py`)", body)


if __name__ == "__main__":
    main()
