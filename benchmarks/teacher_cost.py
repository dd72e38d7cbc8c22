"""Teacher evaluations per sample and wall time per training step of the discrete targets.

Issue 19, item 2: the teacher-ODE target integrated every pair, the ``r = t`` ones included
(75 % of the batch under the shipped pair sampler), and evaluated the teacher again at
``(z_t, t)`` where ``v`` is known: 9 evaluations per sample per step for Heun with 4 steps
(mfcore-distill's ``DistillConfig`` defaults: ``warmup_ode_steps=4``,
``warmup_ode_method="heun"``, ``equal_fraction=0.75``, logit-normal(-0.4, 1.0) times). Now
only the pairs with ``r < t`` are integrated, each from ``v``.

Every case runs :class:`~mfcore.losses.MeanFlowLoss` with that pair sampler and a whole
training step (loss, backward, Adam step) on a small MLP teacher and student
(``dimension 16``, 3 x 256 SiLU, batch 256); a wrapper counts the rows of every teacher
call, the loss's own ``v`` included, so the count is the same for any mfcore tree. Cases:
the teacher-ODE target, the split targets (teacher on ``[s, t]``, on both pieces), and the
warm-up switch in its discrete phase with the agreement signals every step (their
differential target next to the discrete one) and in its blend (both targets every step).

Writes ``benchmarks/results/teacher_cost_cpu.json`` and the ``teacher_cost`` section of
docs/benchmarks.md. ``--before DIR`` also runs the cases with the mfcore source tree in
``DIR`` (e.g. ``git archive <rev> mfcore | tar -x -C DIR``), in a subprocess, for a
before/after table. Usage: ``python benchmarks/teacher_cost.py [--steps 40] [--before DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "teacher_cost_cpu.json"
BATCH, DIM, WIDTH = 256, 16, 256


def _mlp(inputs: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(inputs, WIDTH), nn.SiLU()]
    layers += [nn.Linear(WIDTH, WIDTH), nn.SiLU(), nn.Linear(WIDTH, WIDTH), nn.SiLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, DIM))


class Teacher(nn.Module):
    """``v(z, t)``, counting the rows it is called on."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp(DIM + 1).requires_grad_(False)
        self.rows = 0

    def forward(self, z, t):
        self.rows += z.shape[0]
        return self.net(torch.cat([z, t[:, None]], dim=1))


class Student(nn.Module):
    """``u(z, r, t)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp(DIM + 2)

    def forward(self, z, r, t):
        return self.net(torch.cat([z, r[:, None], (t - r)[:, None]], dim=1))


def _cases() -> dict:
    """``name -> a fresh target``, at mfcore-distill's discrete defaults (Heun, 4 steps)."""
    from mfcore.targets import DifferentialTarget, SplitTarget, TeacherODETarget
    from mfcore.warmup import SwitchGate, WarmupTarget

    def ode():
        return TeacherODETarget(steps=4, method="heun")

    return {
        "TeacherODETarget(4, heun)": ode,
        "SplitTarget('first', 4, heun)": lambda: SplitTarget("first", 4, "heun"),
        "SplitTarget('both', 4, heun)": lambda: SplitTarget("both", 4, "heun"),
        "WarmupTarget, discrete, signals every step": lambda: WarmupTarget(
            ode(), DifferentialTarget("func"), switch_step=10**9, gate=SwitchGate(), every=1
        ),
        "WarmupTarget, blend (both targets)": lambda: WarmupTarget(
            ode(), DifferentialTarget("func"), switch_step=0, blend_steps=10**9
        ),
    }


def measure(steps: int) -> dict:
    """Teacher rows per sample and wall time per step of every case (after 5 untimed)."""
    import mfcore
    from mfcore.losses import AdaptiveWeight, MeanFlowLoss
    from mfcore.time import LogitNormalTime, TimePairSampler

    out = {"mfcore": str(Path(mfcore.__file__).parent)}
    for name, make in _cases().items():
        torch.manual_seed(0)
        teacher, student = Teacher(), Student()
        sampler = TimePairSampler(LogitNormalTime(-0.4, 1.0), equal_fraction=0.75)
        loss_fn = MeanFlowLoss(sampler, make(), AdaptiveWeight(p=1.0))
        opt = torch.optim.Adam(student.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(1)
        times, evals = [], []
        for step in range(steps + 5):
            x = torch.randn(BATCH, DIM, generator=gen)
            teacher.rows = 0
            start = time.perf_counter()
            loss, _ = loss_fn(student, x, teacher=teacher, step=step, generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step >= 5:
                times.append(time.perf_counter() - start)
                evals.append(teacher.rows / BATCH)
        out[name] = {
            "teacher_evals_per_sample": statistics.fmean(evals),
            "median_ms": 1e3 * statistics.median(times),
            "mean_ms": 1e3 * statistics.fmean(times),
        }
    return out


def _before(tree: str, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": tree}
    cmd = [sys.executable, __file__, "--json-only", "--steps", str(steps)]
    return json.loads(subprocess.run(cmd, env=env, capture_output=True, check=True).stdout)


def _table(now: dict, before: dict | None) -> str:
    if before is None:
        rows = ["| case | teacher evals / sample | step (ms, median) |", "|---|---|---|"]
    else:
        rows = [
            "| case | teacher evals / sample, before | after | step (ms, median), before "
            "| after | speed-up |",
            "|---|---|---|---|---|---|",
        ]
    for name, row in now.items():
        if name == "mfcore":
            continue
        cost, ms = row["teacher_evals_per_sample"], row["median_ms"]
        if before is None:
            rows.append(f"| {name} | {cost:.3f} | {ms:.1f} |")
            continue
        old = before[name]
        speed = old["median_ms"] / ms
        rows.append(
            f"| {name} | {old['teacher_evals_per_sample']:.3f} | {cost:.3f} | "
            f"{old['median_ms']:.1f} | {ms:.1f} | {speed:.2f}x |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per case")
    parser.add_argument("--before", help="an mfcore source tree to run too (before/after)")
    parser.add_argument("--before-label", default="", help="what that tree is (e.g. a commit)")
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.json_only:
        print(json.dumps(measure(args.steps)))
        return
    from _report import provenance, update_section  # benchmarks/ is on sys.path

    before = _before(args.before, args.steps) if args.before else None
    load = os.getloadavg()[0]
    now = measure(args.steps)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    result = {"after": now, "before": before, "load_before": load, "steps": args.steps}
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    device = f"{platform.machine()} CPU, 1 thread, load average {load:.1f} (a shared machine)"
    body = (
        f"{provenance(device)} Batch {BATCH}, dimension {DIM}, MLP teacher and student "
        f"(3 x {WIDTH} SiLU); {args.steps} timed training steps per case after 5 untimed."
    )
    if before is not None:
        body += f" Before: {args.before_label or args.before}."
    body += f"\n\n{_table(now, before)}"
    title = "Teacher evaluations per step of the discrete targets (`benchmarks/teacher_cost.py`)"
    update_section("teacher_cost", title, body)
    print(_table(now, before))


if __name__ == "__main__":
    main()
