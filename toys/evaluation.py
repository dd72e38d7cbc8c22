"""A toy run's evaluation: the teacher, the data floor and the student at each step count on
one fresh data sample (:func:`mfcore.toys.metrics.evaluate`), and its summary table.
"""

from __future__ import annotations

from typing import Any

import torch

from mfcore.solvers import sample_meanflow, sample_teacher

from .config import METRIC_KEYS, ToyConfig
from .gmm import GaussianMixture
from .metrics import evaluate

__all__ = ["finite_metrics", "evaluate_run", "summary_table"]


def finite_metrics(samples: torch.Tensor, teacher: GaussianMixture, data: torch.Tensor) -> dict:
    if not bool(torch.isfinite(samples).all()):
        return dict.fromkeys(METRIC_KEYS)
    return evaluate(samples, teacher, data)


def evaluate_run(cfg: ToyConfig, teacher: GaussianMixture, student, gen) -> dict[str, Any]:
    n, dim = cfg.eval_samples, teacher.dim
    data = teacher.sample(n, generator=gen)
    floor = teacher.sample(n, generator=gen)
    noise = torch.randn(n, dim, generator=gen)
    teacher_x, teacher_traj = sample_teacher(
        teacher, noise, cfg.teacher_steps, method="heun", return_trajectory=True
    )
    out: dict[str, Any] = {
        "teacher": {
            "method": "heun",
            "steps": cfg.teacher_steps,
            "nfe": 2 * cfg.teacher_steps,
            **evaluate(teacher_x, teacher, data),
        },
        "data_floor": evaluate(floor, teacher, data),
        "student": {},
    }
    samples: dict[str, Any] = {"data": data, "teacher": teacher_x, "teacher_traj": teacher_traj}
    for k in cfg.eval_steps:
        try:
            x, traj = sample_meanflow(student, noise, k, return_trajectory=True)
        except FloatingPointError:
            out["student"][str(k)] = {"nfe": k, **dict.fromkeys(METRIC_KEYS)}
            continue
        out["student"][str(k)] = {"nfe": k, **finite_metrics(x, teacher, data)}
        samples[str(k)] = x
        samples[f"traj_{k}"] = traj
    return out | {"_samples": samples}


def summary_table(results: dict) -> str:
    """A plain-text table of the metrics: data floor, teacher and student rows."""
    head = f"{'':<14}{'NFE':>5}" + "".join(f"{k:>16}" for k in METRIC_KEYS)
    rows = [head, "-" * len(head)]

    def row(label: str, nfe: Any, m: dict) -> str:
        cells = "".join(
            f"{'n/a':>16}" if m.get(k) is None else f"{m[k]:>16.4f}" for k in METRIC_KEYS
        )
        return f"{label:<14}{nfe!s:>5}{cells}"

    rows.append(row("data floor", "-", results["data_floor"]))
    rows.append(row("teacher", results["teacher"]["nfe"], results["teacher"]))
    for k, m in results["student"].items():
        rows.append(row(f"student {k}-step", m["nfe"], m))
    tr = results["training"]
    rows.append(
        f"training: {tr['steps_done']} steps in {tr['wall_s']:.1f} s "
        f"({tr['ms_per_step']:.1f} ms/step), warm-up switch at {tr['switch_step']}, "
        f"collapsed: {tr['collapsed']}"
    )
    return "\n".join(rows)
