"""Time and peak memory of each du/dt backend relative to one forward pass.

Measures, for an MLP student and a small transformer-like student (attention through
``mfcore.attention``), the median wall time and the peak memory of

- ``forward``: one no-grad forward (the unit);
- ``func`` / ``autograd`` / ``fd``: ``total_derivative(..., keep_graph=False)``;
- ``fwd+bwd``: a forward with the graph and a backward (what a flow-matching step costs);
- ``func+loss``: ``total_derivative(..., keep_graph=True)`` then a backward through ``u``
  (what one MeanFlow step costs with the single-forward path), with the tangents' history
  cut at every module (the default);
- ``func+loss, history kept``: the same with ``detach_tangents=False``.

Peak memory is ``torch.cuda.max_memory_allocated`` growth on CUDA; on CPU it is the growth
of the process's peak resident set size, each case in a fresh subprocess (coarser: it
includes allocator slack). Writes ``benchmarks/results/jvp_backends_<device>.json`` and
replaces the ``jvp_backends`` section of ``docs/benchmarks.md``.

Usage: ``python benchmarks/jvp_backends.py [--device cuda] [--repeats 20]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from _nets import MLP, Transformer  # benchmarks/ is on sys.path as the script's dir
from _report import provenance, update_section

from mfcore.jvp import total_derivative

ROOT = Path(__file__).resolve().parent.parent
CASES = ("forward", "func", "autograd", "fd", "fwd+bwd", "func+loss", "func+loss, history kept")


def _build(model: str, device: str):
    torch.manual_seed(0)
    if model == "mlp":
        net, shape = MLP(), (256, 64)
    else:
        net, shape = Transformer(), (4, 256, 16)
    net = net.to(device)
    z = torch.randn(shape, device=device)
    v = torch.randn(shape, device=device)
    t = torch.rand(shape[0], device=device)
    return net, z, t * torch.rand(shape[0], device=device), t, v


def _step(case, net, z, r, t, v):
    if case == "forward":
        with torch.no_grad():
            net(z, r, t)
    elif case == "fwd+bwd":
        net(z, r, t).square().mean().backward()
    elif case.startswith("func+loss"):
        cut = case == "func+loss"
        u, _ = total_derivative(
            net, z, r, t, v, method="func", keep_graph=True, detach_tangents=cut
        )
        u.square().mean().backward()
    else:
        total_derivative(net, z, r, t, v, method=case)


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _measure(model, case, device, repeats):
    net, z, r, t, v = _build(model, device)
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # the peak so far: model, inputs and torch itself
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _step(case, net, z, r, t, v)  # warm-up (its peak counts: same work as the timed steps)
    times = []
    for _ in range(repeats):
        net.zero_grad(set_to_none=True)
        _sync(device)
        start = time.perf_counter()
        _step(case, net, z, r, t, v)
        _sync(device)
        times.append(time.perf_counter() - start)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"ms": 1e3 * statistics.median(times), "peak_mb": max(peak, 0) / 2**20}


def _in_subprocess(args):
    return _measure(*args)


def run(device: str, repeats: int) -> dict:
    results = {}
    ctx = mp.get_context("spawn")
    for model in ("mlp", "transformer"):
        rows = {}
        for case in CASES:
            if device == "cpu":  # a fresh process per case so peak RSS means this case
                with ctx.Pool(1) as pool:
                    rows[case] = pool.apply(_in_subprocess, ((model, case, device, repeats),))
            else:
                rows[case] = _measure(model, case, device, repeats)
        unit = rows["forward"]
        for row in rows.values():
            row["time_x_forward"] = row["ms"] / unit["ms"]
            row["mem_x_forward"] = row["peak_mb"] / unit["peak_mb"] if unit["peak_mb"] else None
        results[model] = rows
    return results


def _device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _table(meta, results) -> str:
    lines = [
        provenance(meta["device_name"]) + f" Median of {meta['repeats']}.",
        "",
        "| model | case | time (ms) | x forward | peak memory (MB) | x forward |",
        "|---|---|---|---|---|---|",
    ]
    for model, rows in results.items():
        for case, row in rows.items():
            mem_x = "" if row["mem_x_forward"] is None else f"{row['mem_x_forward']:.2f}"
            lines.append(
                f"| {model} | {case} | {row['ms']:.2f} | {row['time_x_forward']:.2f} | "
                f"{row['peak_mb']:.1f} | {mem_x} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    results = run(args.device, args.repeats)
    meta = {
        "device": args.device,
        "device_name": _device_name(args.device),
        "torch": torch.__version__,
        "date": date.today().isoformat(),
        "repeats": args.repeats,
        "command": "python " + " ".join(sys.argv),
    }
    out = ROOT / "benchmarks" / "results" / f"jvp_backends_{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    table = _table(meta, results)
    update_section("jvp_backends", "JVP backends (`benchmarks/jvp_backends.py`)", table)
    print(table)


if __name__ == "__main__":
    main()
