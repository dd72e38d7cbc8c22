"""The variants of the digits benchmark over seeds, resumable run by run.

Each variant is a set of ``DistillConfig`` settings on top of the benchmark's
(:func:`~.bench.distill_config`), all at the same budget (optimiser steps and batch):

- ``default``: the benchmark's recipe: the shipped defaults but for the switch, gated,
  guarded, with rollback, as the grid was measured (the gate never opened; ``discrete`` is
  the switch the entry point now ships, ``never``);
- ``discrete``: the discrete (teacher-ODE) warm-up target throughout;
- ``differential``: the differential MeanFlow target from the first step;
- ``fixed``: warm-up, then the differential target at ``warmup_steps``, unguarded (the
  MeanFlow paper's schedule);
- ``fixed-guarded``: the same behind the guard (and rollback);
- ``discrete-100``: the discrete target for 100 steps, about the teacher evaluations of
  400 steps of ``differential``: the Heun-4 target costs 1 + 7 x (share of ``r < t``
  pairs) = 4.06 evaluations per sample and step with the shipped pairs (a quarter grid
  pairs, 75 % ``r = t`` among the rest), the differential target 1;
- each of the first five with ``-align``: plus the fake-velocity alignment critic
  (``--align fake``);
- ``default-2000``, ``default-lr1e-3``: the shipped default at 5x the steps, and at a 10x
  learning rate (whether the budget or the learning rate limits the 1-step student);
- ``arcflow``: ArcFlow's momentum-mixture student (``--student arcflow``), trained on the
  2-step rollout (2 NFE), at the same budget (7.8 teacher evaluations per sample and step
  against the default's 4.06); ``arcflow-200`` at half the steps (its teacher-mixing phase,
  ``warmup_steps``, then spans the whole run: 1.4x the default's evaluations, not 1x);
  ``default-800`` the default at about ``arcflow``'s evaluations.

Every finished run is appended to ``<out>/grid/runs.jsonl``, keyed by variant, settings and
seed, and its samples go to ``<out>/grid/samples/``; an interrupted invocation resumes with
the next unfinished run (:mod:`mfcore.toys.experiments`' pattern). ``grid/figure.png`` shows
the default's and ArcFlow's samples beside the teacher's. The variants run in
:data:`ORDER`, seed by seed, so a short invocation covers the first variants first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from mfcore.adapters.distill import DistillConfig

from .bench import STEPS, TOY_SETTINGS, BenchConfig, prepare, run_variant
from .figures import plot_grid

__all__ = [
    "VARIANTS",
    "ORDER",
    "FIGURE_VARIANTS",
    "record",
    "run_grid",
    "summarise",
    "format_grid",
    "plot_variants",
]

logger = logging.getLogger(__name__)

_BASE: dict[str, dict[str, Any]] = {
    "default": {},
    "discrete": {"switch": "never"},
    "differential": {"switch": "fixed", "warmup_steps": 0, "guard": False},
    "fixed": {"switch": "fixed", "guard": False},
    "fixed-guarded": {"switch": "fixed"},
}
_EQUAL_COST = {"discrete-100": {"switch": "never", "steps": 100}}
_ARCFLOW = {
    "arcflow": {"student": "arcflow"},
    "arcflow-200": {"student": "arcflow", "steps": 200},
    "default-800": {"steps": 800},
}
_BUDGET = {"default-2000": {"steps": 2000}, "default-lr1e-3": {"lr": 1e-3}}
VARIANTS: dict[str, dict[str, Any]] = (
    _BASE
    | _EQUAL_COST
    | {f"{name}-align": settings | {"align": "fake"} for name, settings in _BASE.items()}
    | _BUDGET
    | _ARCFLOW
)
"""Variant name -> its ``DistillConfig`` settings."""

ORDER = (*_BASE, *_EQUAL_COST, *(f"{name}-align" for name in _BASE), *_BUDGET, *_ARCFLOW)
"""The order the variants run in (the issue's priorities first)."""


def _recipe(settings: dict[str, Any]) -> dict[str, Any]:
    """Every ``DistillConfig`` setting a run trains with (the shipped defaults as they are in
    this version, then the benchmark's and the variant's), without the paths: a run made
    before a default changed is not taken for one made after."""
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(DistillConfig)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    resolved = defaults | TOY_SETTINGS | settings
    return {k: v for k, v in resolved.items() if k not in _NOT_RECIPE | _LOGGING}


_NOT_RECIPE = {"data", "output", "model", "seed", "progress", "resume"}
_LOGGING = {"tensorboard", "report_to"}  # where a run logs (the old flag and its successor)


def _key(name: str, seed: int, bench: BenchConfig) -> str:
    """What makes two runs the same: the variant's whole training recipe, the benchmark's
    evaluation, the seed."""
    scored = {"per_class": bench.per_class, "eval_seed": bench.eval_seed}
    scored |= {"cfg_scale": bench.cfg_scale, "teacher": dataclasses.asdict(bench.teacher)}
    settings = _recipe(bench.distill | VARIANTS[name]) | scored
    return json.dumps({"variant": name, **settings, "seed": seed}, sort_keys=True, default=str)


def _normal(key: str) -> str:
    """A run's key with every ``DistillConfig`` setting it predates filled in at its
    default: a setting is added at the default that keeps what the code did before it (as
    ``--student meanflow``), so a run made before it is the same run."""
    entries = {k: v for k, v in json.loads(key).items() if k not in _LOGGING}
    for name, value in _recipe({}).items():
        entries.setdefault(name, value)
    return json.dumps(entries, sort_keys=True, default=str)


def _done(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {_normal(row["key"]): row for row in rows}


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation over seeds of every score, per variant and step count."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == name]
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in runs]}
        for field in ("teacher_evaluations", "seconds", "differential_steps", "reverts"):
            entry[field] = statistics.fmean(float(r[field]) for r in runs)
        for k in (str(s) for s in STEPS):
            scores = [r["steps"][k] for r in runs]
            entry[k] = {
                m: (
                    statistics.fmean(s[m] for s in scores),
                    statistics.stdev(s[m] for s in scores) if len(scores) > 1 else 0.0,
                )
                for m in scores[0]
            }
        out[name] = entry
    return out


def format_grid(
    summary: dict[str, dict[str, Any]], references: dict[str, dict], teacher_steps: int = 50
) -> str:
    """Markdown: one table per step count, references first, mean ± sd over seeds."""
    lines = []
    ref = f"teacher {teacher_steps}"
    for k in (str(s) for s in STEPS):
        lines += [
            f"\n**{k} step{'s' if k != '1' else ''}**\n",
            "| samples | seeds | accuracy | Fréchet distance | precision | recall "
            "| RMS to teacher 50 | teacher evals | seconds |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name in ("data", ref, f"{ref} seed 2", f"teacher euler {k}"):
            if name in references:
                r = references[name]
                cells = [f"{r[m]:.3f}" if m in r else "-" for m in _METRICS]
                lines.append(f"| {name} | - | " + " | ".join(cells) + " | - | - |")
        for name, e in summary.items():
            one = len(e["seeds"]) == 1  # no spread to show
            cells = [
                f"{e[k][m][0]:.3f}" + ("" if one else f" ± {e[k][m][1]:.3f}") for m in _METRICS
            ]
            lines.append(
                f"| {name} | {len(e['seeds'])} | " + " | ".join(cells)
                + f" | {e['teacher_evaluations']:.3g} | {e['seconds']:.0f} |"
            )  # fmt: skip
    return "\n".join(lines)


_METRICS = ("accuracy", "fd", "precision", "recall", "to_teacher")


def record(
    bench: BenchConfig,
    labels: Tensor,
    name: str,
    seed: int,
    row: dict[str, Any],
    samples: dict[str, Tensor],
) -> dict[str, Any]:
    """Append a finished run of variant ``name`` to ``<out>/grid/runs.jsonl`` and write its
    samples; returns the row as logged. The default benchmark records its run here too:
    it is the grid's ``default`` at seed 0."""
    out = Path(bench.out) / "grid"
    (out / "samples").mkdir(parents=True, exist_ok=True)
    row = row | {"key": _key(name, seed, bench), "variant": name}
    tensors = {"labels": labels} | {k.replace(" ", "_"): v.contiguous() for k, v in samples.items()}
    save_file(tensors, str(out / "samples" / f"{name}-seed{seed}.safetensors"))
    with (out / "runs.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def run_grid(
    bench: BenchConfig, *, only: list[str] | None = None, seeds: int = 3, run: bool = True
) -> str:
    """Run (or resume) the variants ``only`` (default all, in :data:`ORDER`) at ``seeds``
    seeds; write ``grid/results.json`` and ``grid/tables.md``; return the tables. Without
    ``run`` only the finished runs are summarised (several invocations may share a grid)."""
    names = [n for n in ORDER if only is None or n in only]
    unknown = sorted(set(only or ()) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; the variants are {list(ORDER)}")
    setup = prepare(bench)
    out = Path(bench.out) / "grid"
    done = _done(out / "runs.jsonl")
    rows = []
    for seed in range(seeds):
        for name in names:
            key = _normal(_key(name, seed, bench))
            if key in done:
                rows.append(done[key])
                continue
            if not run:
                continue
            logger.info("grid: %s seed %d", name, seed)
            row, samples = run_variant(setup, f"grid-{name}", seed, VARIANTS[name])
            rows.append(record(bench, setup.labels, name, seed, row, samples))
    summary = summarise(rows)
    tables = format_grid(summary, setup.rows, bench.teacher_steps)
    (out / "results.json").write_text(
        json.dumps({"references": setup.rows, "summary": summary, "runs": rows}, indent=1)
    )
    (out / "tables.md").write_text(tables + "\n")
    plot_variants(setup, out / "figure.png")
    return tables


FIGURE_VARIANTS = ("default", "arcflow")
"""The variants whose seed-0 samples :func:`plot_variants` shows beside the teacher's."""


def plot_variants(setup: Any, path: Path, steps: tuple[int, ...] = (1, 2)) -> None:
    """Samples of the :data:`FIGURE_VARIANTS` that have run (seed 0, ``steps`` steps)
    beside the teacher's 50-step and 1-step Euler ones, one row per class, as a PNG."""
    sets = {
        name: (setup.references[name], setup.labels)
        for name in (f"teacher {setup.bench.teacher_steps}", "teacher euler 1")
    }
    for name in FIGURE_VARIANTS:
        file = path.parent / "samples" / f"{name}-seed0.safetensors"
        if file.is_file():
            saved = load_file(str(file))
            sets |= {f"{name} {k}": (saved[f"student_{k}"], saved["labels"]) for k in steps}
    plot_grid(sets, path)
