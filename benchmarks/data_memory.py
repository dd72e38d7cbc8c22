"""Peak memory of reading a training data folder against its size (``LatentDataset``).

Writes a synthetic FLUX data folder at 1x, 4x and 16x files (``--files`` files of
``--per-file`` samples of ``--channels x --size x --size`` fp32 latents each, written once,
before any measurement), then, for each size in a fresh subprocess, builds a
``LatentDataset`` and reads one epoch in batches of ``--batch``, and records the peak
resident memory (``ru_maxrss``) and its rise over the memory before the first batch. The
goal is flat: a run's memory must not depend on its dataset's size.

``--before FILE`` also measures another revision's ``adapters/data.py`` (e.g.
``git show <rev>:adapters/data.py > FILE``), loaded by path in the same way, for a
before/after table.

Writes ``benchmarks/results/data_memory.json`` and the ``data_memory`` section of
docs/benchmarks.md.

    python benchmarks/data_memory.py [--before /tmp/data_before.py --before-label "main at REV"]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import provenance, update_section

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "data_memory.json"
SCALES = (1, 4, 16)

# The measurement, run in a fresh interpreter: argv = folder, batch, data.py path or "".
_CHILD = r"""
import importlib.util, json, resource, sys
folder, batch, source = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if source:
    spec = importlib.util.spec_from_file_location("data_under_test", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    LatentDataset = module.LatentDataset
else:
    from mfcore.adapters.data import LatentDataset
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
data = LatentDataset(folder)
start = peak_mb()
for step in range(len(data) // batch):
    x, cond = data.batch(step, batch, 0, "cpu")
    del x, cond
print(json.dumps({"samples": len(data), "start_mb": start, "peak_mb": peak_mb()}))
"""


def _measure(folder: Path, batch: int, source: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(folder), str(batch), source],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir()) / 2**20


def _table(rows: list[dict], labels: list[str]) -> str:
    head = "| files | samples | data (MiB) | " + " | ".join(
        f"{lab}: peak RSS (MiB) | {lab}: rise while reading (MiB)" for lab in labels
    )
    lines = [head + " |", "|---" * (3 + 2 * len(labels)) + "|"]
    for row in rows:
        cells = [str(row["files"]), str(row["samples"]), f"{row['data_mb']:.0f}"]
        for lab in labels:
            m = row[lab]
            cells += [f"{m['peak_mb']:.0f}", f"{m['peak_mb'] - m['start_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=4, help="files at 1x")
    parser.add_argument("--per-file", type=int, default=8, help="samples per file")
    parser.add_argument("--channels", type=int, default=16, help="latent channels")
    parser.add_argument("--size", type=int, default=64, help="latent height and width")
    parser.add_argument("--batch", type=int, default=4, help="samples per batch")
    parser.add_argument("--before", default="", help="another revision's adapters/data.py")
    parser.add_argument("--before-label", default="", help="what that file is (e.g. a commit)")
    args = parser.parse_args()

    from mfcore.adapters.data import make_synthetic_data

    labels = (["before"] if args.before else []) + ["after"]
    sources = {"before": os.path.abspath(args.before) if args.before else "", "after": ""}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in SCALES:
            folder = Path(tmp) / f"x{scale}"
            make_synthetic_data(
                folder,
                num_files=args.files * scale,
                per_file=args.per_file,
                channels=args.channels,
                height=args.size,
                width=args.size,
            )
            row = {"scale": scale, "files": args.files * scale, "data_mb": _folder_mb(folder)}
            for lab in labels:
                row[lab] = _measure(folder, args.batch, sources[lab])
            row["samples"] = row["after"]["samples"]
            rows.append(row)
            print(json.dumps(row))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("files", "per_file", "channels", "size", "batch")}
    RESULTS.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    device = f"{platform.machine()} CPU"
    body = (
        f"{provenance(device)} FLUX-format files of {args.per_file} samples of "
        f"{args.channels} x {args.size} x {args.size} fp32 latents; one epoch in batches of "
        f"{args.batch}, each size in a fresh process; peak RSS is `ru_maxrss`, the rise is "
        "over the RSS peak before the first batch (imports and the folder scan)."
    )
    if args.before:
        body += f" Before: {args.before_label or args.before}."
    body += f"\n\n{_table(rows, labels)}"
    update_section("data_memory", "Data reading memory (`benchmarks/data_memory.py`)", body)
    print(_table(rows, labels))


if __name__ == "__main__":
    main()
