"""Host syncs per ``MeanFlowLoss`` call, counted on the CPU.

A host sync (``bool(t)``, ``t.item()``, ``t.tolist()``, a value-dependent shape such as
``nonzero``) makes a GPU's host wait for every queued kernel; the design allows a training
step's hot path at most one. ``tests/_syncs.py`` counts them on the CPU with a
``TorchDispatchMode`` (``aten._local_scalar_dense``, ``aten.item``, ``aten.is_nonzero``,
``aten.equal``, ``aten.nonzero``, ``aten.masked_select``, the ``unique`` ops,
``aten.repeat_interleave``, ``aten.bincount``, boolean-mask ``aten.index``/``index_put``)
and a ``TorchFunctionMode`` (``Tensor.tolist``, ``Tensor.numpy``, ``Tensor.__array__``, which
copy values out without a dispatched op). Each path is called once to warm up, then
counted over one call (the counts do not vary between calls).

Writes ``benchmarks/results/host_syncs_cpu.json`` and the ``host_syncs`` section of
docs/benchmarks.md. ``--before DIR`` also counts the same paths with the mfcore source
tree in ``DIR`` (e.g. ``git archive <rev> | tar -x -C DIR``), in a subprocess, for a
before/after table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "host_syncs_cpu.json"
BATCH, DIM = 64, 8


class Student(nn.Module):
    """``u(z, r, t, y=None)``: a small MLP (a label embedding when conditioned)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM + 2, 64), nn.SiLU(), nn.Linear(64, DIM))
        self.label = nn.Embedding(11, DIM)

    def forward(self, z, r, t, y=None):
        h = z if y is None else z + self.label(y)
        return self.net(torch.cat([h, r[:, None], (t - r)[:, None]], dim=1))


def teacher(z, t, y=None):
    """A linear teacher velocity field."""
    return -z * (1.0 - t)[:, None]


def foreign_pairs(batch, *, device=None, dtype=torch.float32, generator=None):
    """A user's own pair sampler (not one of mfcore.time's): its draws are checked."""
    t = torch.rand(batch, device=device, dtype=dtype, generator=generator)
    return t * torch.rand(batch, device=device, dtype=dtype, generator=generator), t


def _paths() -> dict[str, tuple]:
    """``name -> (loss_fn, kwargs of the call, steps to call at)``."""
    from mfcore.guidance import MeanFlowGuidance
    from mfcore.losses import MeanFlowLoss
    from mfcore.targets import TeacherODETarget
    from mfcore.warmup import WarmupTarget

    warmup = WarmupTarget(TeacherODETarget(steps=4), switch_step=10**6, every=10)
    guidance = MeanFlowGuidance(1.5, 0.5, uncond={"y": 10}, label_dropout=0.1)
    y = torch.randint(0, 10, (BATCH,))
    r = torch.rand(BATCH) * 0.5
    return {
        "default (from data)": (MeanFlowLoss(), {}, None),
        "default, with a teacher": (MeanFlowLoss(), {"teacher": teacher}, None),
        "TeacherODETarget(steps=4)": (
            MeanFlowLoss(target=TeacherODETarget(steps=4)),
            {"teacher": teacher},
            None,
        ),
        "WarmupTarget, not a cadence step": (
            MeanFlowLoss(target=warmup),
            {"teacher": teacher},
            (13, 14),
        ),
        "WarmupTarget, a cadence step": (
            MeanFlowLoss(target=warmup),
            {"teacher": teacher},
            (19, 20),
        ),
        "guided (MeanFlowGuidance)": (MeanFlowLoss(guidance=guidance), {"cond": {"y": y}}, None),
        "fixed times r=, t=": (MeanFlowLoss(), {"r": r, "t": r + 0.5}, None),
        "fixed times, validate=False (mfcore-distill's step)": (
            MeanFlowLoss(),
            {"r": r, "t": r + 0.5, "validate": False},
            None,
        ),
        "a foreign time sampler": (MeanFlowLoss(time_sampler=foreign_pairs), {}, None),
    }


def _counter():
    """``tests/_syncs.py``'s ``count_host_reads``, loaded by path (so that ``--before`` can
    count another tree's mfcore with this counter)."""
    spec = importlib.util.spec_from_file_location("_syncs", ROOT / "tests" / "_syncs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.count_host_reads


def count() -> dict[str, dict]:
    """Host reads of one call per path (after a warm-up call)."""
    count_host_reads = _counter()
    torch.manual_seed(0)
    student, out = Student(), {}
    for name, (loss_fn, kwargs, steps) in _paths().items():
        warm_step, step = steps if steps is not None else (None, None)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, DIM, generator=gen)
        try:
            loss_fn(student, x, step=warm_step, generator=gen, **kwargs)[0].backward()
        except TypeError:  # a keyword the counted tree's loss does not take yet: no row
            continue
        with count_host_reads() as reads:
            loss_fn(student, x, step=step, generator=gen, **kwargs)
        out[name] = {"syncs": len(reads), "ops": dict(Counter(reads))}
    return out


def _before(tree: str) -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": tree}
    cmd = [sys.executable, __file__, "--json-only"]
    return json.loads(subprocess.run(cmd, env=env, capture_output=True, check=True).stdout)


def _table(now: dict, before: dict | None) -> str:
    head = "| path | syncs per call | what reads the host |"
    rule = "|---|---|---|"
    if before is not None:
        head, rule = "| path | before | after | what reads the host (after) |", "|---|---|---|---|"
    rows = [head, rule]
    for name, row in now.items():
        ops = ", ".join(f"{op} x{n}" for op, n in row["ops"].items()) or "-"
        old = "" if before is None else f" {before.get(name, {}).get('syncs', 'n/a')} |"
        rows.append(f"| {name} |{old} {row['syncs']} | {ops} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="an mfcore source tree to count too (before/after)")
    parser.add_argument("--before-label", default="", help="what that tree is (e.g. a commit)")
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    now = count()
    if args.json_only:
        print(json.dumps(now))
        return
    from _report import provenance, update_section

    before = _before(args.before) if args.before else None
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"after": now, "before": before}, indent=1) + "\n")
    device = f"{platform.machine()} CPU, counted with a TorchDispatchMode (see the script)"
    body = f"{provenance(device)} Batch {BATCH}, dimension {DIM}."
    if before is not None:
        body += f" Before: {args.before_label or args.before}."
    body += f"\n\n{_table(now, before)}"
    update_section(
        "host_syncs", "Host syncs per MeanFlowLoss call (`benchmarks/host_syncs.py`)", body
    )
    print(_table(now, before))


if __name__ == "__main__":
    main()
