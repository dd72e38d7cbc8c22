"""Wall time of the toy main job, ``mfcore-toy`` with no argument, as a user runs it.

Runs ``/usr/bin/time -v mfcore-toy`` (ring8) and ``/usr/bin/time -v mfcore-toy --preset
grid25`` ``--repeats`` times each (default 3), each in a fresh temporary folder (so it
writes ``runs/`` there, figures included), and records the wall time, the CPU share, the
peak memory, the training's ms per step (from ``metrics.json``), the load average of the
machine just before the run (a busy machine inflates every number) and the acceptance
metrics of the 1-step student.

Writes ``benchmarks/results/toy_main_job.json`` and the ``toy_main_job`` section of
docs/benchmarks.md. Run it on a quiet machine: it measures wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import provenance, update_section

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "toy_main_job.json"
PRESETS = {"ring8": [], "grid25": ["--preset", "grid25"]}


def _time_v(field: str, text: str) -> str:
    match = re.search(rf"^\s*{re.escape(field)}: (.+)$", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/usr/bin/time -v printed no {field!r}")
    return match.group(1).strip()


def _seconds(clock: str) -> float:
    """``h:mm:ss`` or ``m:ss.ss`` as seconds."""
    total = 0.0
    for part in clock.split(":"):
        total = 60.0 * total + float(part)
    return total


def one_run(name: str, args: list[str], toy: str) -> dict:
    """One ``mfcore-toy`` run in a fresh folder, under ``/usr/bin/time -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        load = os.getloadavg()[0]
        proc = subprocess.run(
            ["/usr/bin/time", "-v", toy, *args],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=True,
        )
        metrics = json.loads((Path(tmp) / "runs" / name / "metrics.json").read_text())
    one, teacher = metrics["student"]["1"], metrics["teacher"]
    return {
        "wall_s": _seconds(_time_v("Elapsed (wall clock) time (h:mm:ss or m:ss)", proc.stderr)),
        "cpu_percent": float(_time_v("Percent of CPU this job got", proc.stderr).rstrip("%")),
        "max_rss_mb": int(_time_v("Maximum resident set size (kbytes)", proc.stderr)) / 1024,
        "load_before": load,
        "ms_per_step": metrics["training"]["ms_per_step"],
        "steps": metrics["training"]["steps_done"],
        "mode_recall_1": one["mode_recall"],
        "mode_precision_1": one["mode_precision"],
        "w2_1": one["w2"],
        "w2_teacher": teacher["w2"],
    }


def _row(name: str, runs: list[dict]) -> str:
    walls = [r["wall_s"] for r in runs]
    loads = " / ".join(f"{r['load_before']:.1f}" for r in runs)
    first = runs[0]
    bars = (
        first["mode_recall_1"] == 1.0
        and first["mode_precision_1"] >= 0.95
        and first["w2_1"] <= 1.5 * first["w2_teacher"]
    )
    return (
        f"| {name} | {' / '.join(f'{w:.1f}' for w in walls)} | {statistics.median(walls):.1f} | "
        f"{statistics.median(r['ms_per_step'] for r in runs):.1f} | "
        f"{statistics.median(r['cpu_percent'] for r in runs):.0f} | "
        f"{loads} | "
        f"{statistics.median(r['max_rss_mb'] for r in runs):.0f} | "
        f"{first['mode_recall_1']:.2f} / {first['mode_precision_1']:.4f} / "
        f"{first['w2_1']:.3f} (<= {1.5 * first['w2_teacher']:.3f}) | {'yes' if bars else 'NO'} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    beside = Path(sys.executable).parent / "mfcore-toy"  # this environment's, before PATH's
    toy = str(beside) if beside.is_file() else shutil.which("mfcore-toy")
    if toy is None:
        parser.error("mfcore-toy is not on PATH (pip install -e '.[toys]')")
    results = {}
    for name, flags in PRESETS.items():
        results[name] = [one_run(name, flags, toy) for _ in range(args.repeats)]
        print(_row(name, results[name]), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    cores = os.cpu_count()
    head = (
        "| preset | wall (s), each run | median wall (s) | ms/step | CPU % | load before | "
        "peak RSS (MB) | 1-step recall / precision / W2 (bar) | bars met |"
    )
    rule = "|---|---|---|---|---|---|---|---|---|"
    table = "\n".join([head, rule, *(_row(name, runs) for name, runs in results.items())])
    device = f"{platform.machine()} CPU, {cores} cores"
    body = (
        f"{provenance(device)} `/usr/bin/time -v mfcore-toy [--preset grid25]`, "
        f"{args.repeats} runs each, each in a fresh folder (figures written).\n\n{table}"
    )
    update_section("toy_main_job", "The toy main job (`benchmarks/toy_main_job.py`)", body)
    print(table)


if __name__ == "__main__":
    main()
