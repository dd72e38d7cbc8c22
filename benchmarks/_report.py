"""What the benchmark scripts share: where a GPU benchmark runs, how it times, and where its
results go.

A GPU benchmark (:func:`gpu_args`) runs at full size on CUDA and as a tiny smoke test
elsewhere and times with :func:`time_and_peak`; its JSON goes to ``benchmarks/results/``
(:func:`write_result`) and its table to its own section of docs/benchmarks.md
(:func:`update_section`). Each benchmark owns the text between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->``; a new section is appended under ``title`` the first time. The header
line records the device, the versions, the date and the command, so every number in the file
says where it came from.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
RESULTS = Path(__file__).resolve().parent / "results"


def provenance(device_name: str) -> str:
    """One line: device, python, torch (and triton when importable), date and command."""
    versions = f"Python {platform.python_version()}, torch {torch.__version__}"
    try:
        import triton

        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    command = "python " + " ".join(sys.argv)
    return f"Device: {device_name}; {versions}; {date.today().isoformat()}; command: `{command}`."


def update_section(name: str, title: str, body: str, docs: Path = DOCS) -> Path:
    """Replace (or append) the section ``name`` of ``docs`` (docs/benchmarks.md) with ``body``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n{block}\n"
    docs.write_text(text)
    return docs


def write_result(name: str, device: str, tiny: bool, result: dict) -> Path:
    """Write ``result`` to ``benchmarks/results/<name>-<device>[-tiny].json``."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{device}{'-tiny' if tiny else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def gpu_args(doc: str, reps: int) -> tuple[argparse.Namespace, torch.device, bool]:
    """Parse ``--reps`` and ``--tiny``; return them, the device and whether to run tiny (off
    CUDA always). On CUDA, cuDNN's SDPA is off (its backward fails at the FLUX slice's shape,
    shared/device/NOTES.md)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--tiny", action="store_true", help="the tiny config even on CUDA")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    return args, device, args.tiny or device.type != "cuda"


def time_and_peak(fn, device: torch.device, reps: int) -> dict:
    """Median wall time of ``reps`` calls of ``fn`` after one warm-up call (allocations,
    autotuning, lazy initialisation), and the peak CUDA memory over them (None off CUDA)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"median_ms": 1e3 * statistics.median(times), "peak_gib": peak, "reps": reps}
