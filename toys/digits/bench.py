"""The default digits benchmark: teacher (cached), one distillation through ``distill(cfg)``
with the shipped defaults, scores, samples and figures.

Steps, each written under ``--out`` (default ``runs/digits``):

1. the digits split in halves per class (:func:`~.data.split`): the first trains the
   teacher, the classifier and the PCA and is the distillation data; the second is the
   held-out reference of every score;
2. the teacher (:mod:`.teacher`), trained once and cached (``--cache``, or the
   ``MFCORE_DIGITS_CACHE`` environment variable; default ``<out>/cache``), with its reference
   samples (50 Euler steps at two noise seeds, and 1, 2, 4 Euler steps);
3. the student: :func:`mfcore.adapters.distill.distill` on the teacher folder and the data
   folder, with :class:`~mfcore.adapters.distill.DistillConfig`'s defaults except
   :data:`TOY_SETTINGS` (the budget and the CPU) and the variant's own settings;
4. scores (:mod:`.metrics`) of every sample set against the held-out half, the student's
   distance to the teacher's 50-step samples from the same noise, teacher evaluations and
   wall time of the distillation; ``results.json``, ``samples.safetensors`` (every set with
   its labels) and ``samples.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from mfcore.adapters.distill import DistillConfig, distill
from mfcore.adapters.flux import FAMILY
from mfcore.adapters.loading import load_scheduler_config
from mfcore.adapters.student import Teacher

from .data import Digits, load_digits, split, to_digits, write_data
from .evaluate import class_labels, pixel_distance, student_samples, teacher_samples
from .figures import plot_grid
from .metrics import Scorer
from .teacher import TeacherConfig, load_conditions, teacher_folder

__all__ = [
    "TOY_SETTINGS",
    "STEPS",
    "BenchConfig",
    "Setup",
    "prepare",
    "distill_config",
    "run_variant",
    "write_results",
    "format_table",
    "main",
]

logger = logging.getLogger(__name__)

TOY_SETTINGS: dict[str, Any] = dict(
    steps=400,
    batch_size=32,
    weights_dtype="fp32",
    device="cpu",
    gradient_checkpointing=False,
    report_to="none",
    checkpoint_every=100,
    preview_every=400,
    switch="gated",
)
"""What the benchmark changes in ``DistillConfig``'s defaults: the budget (optimiser steps,
batch) and the CPU (fp32 weights; no recomputation, which changes no number); and the
switch as the grid was measured, gated and guarded (the default then). The gate never
opened, so these runs trained as the ``never`` default does (the ``discrete`` variant: the
same scores), with the gate's signals on top."""

STEPS = (1, 2, 4)
"""Student (and teacher Euler) step counts that are scored."""


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark's data, references and evaluation."""

    out: str = "runs/digits"
    cache: str | None = None
    per_class: int = 100
    eval_seed: int = 1000
    teacher_steps: int = 50
    cfg_scale: float = 1.0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: dict[str, Any] = field(default_factory=dict)

    def cache_dir(self) -> str:
        return self.cache or os.environ.get("MFCORE_DIGITS_CACHE") or f"{self.out}/cache"


@dataclass
class Setup:
    """What every variant of one benchmark shares."""

    bench: BenchConfig
    train: Digits
    held_out: Digits
    teacher_path: str
    data_path: str
    table: tuple[Tensor, Tensor]
    scheduler: dict[str, Any]
    scorer: Scorer
    labels: Tensor
    references: dict[str, Tensor]
    teacher_record: dict[str, Any]
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)


def _load_teacher(path: str) -> torch.nn.Module:
    model, _ = FAMILY.load_model(path, torch.float32)
    return model.eval()


def _references(bench: BenchConfig, path: str, table, labels, scheduler) -> dict[str, Tensor]:
    """The teacher's samples (50 steps at two seeds, Euler 1/2/4), cached beside it."""
    key = f"refs-n{bench.per_class}-s{bench.eval_seed}-k{bench.teacher_steps}-g{bench.cfg_scale}"
    file = Path(path) / f"{key}.safetensors"
    if file.is_file():
        return load_file(str(file))
    model, refs = _load_teacher(path), {}
    runs = {f"teacher {bench.teacher_steps}": (bench.teacher_steps, bench.eval_seed)}
    runs[f"teacher {bench.teacher_steps} seed 2"] = (bench.teacher_steps, bench.eval_seed + 1)
    runs |= {f"teacher euler {k}": (k, bench.eval_seed) for k in STEPS}
    for name, (steps, seed) in runs.items():
        refs[name] = teacher_samples(
            model, table, labels, steps=steps, seed=seed, cfg_scale=bench.cfg_scale,
            scheduler=scheduler,
        )  # fmt: skip
    save_file(refs, str(file))
    return refs


def prepare(bench: BenchConfig) -> Setup:
    """Data, teacher (trained or cached), data folder, judges and reference samples."""
    train, held_out = split(load_digits())
    cache = bench.cache_dir()
    teacher_path = os.path.join(cache, "teacher")
    record = teacher_folder(teacher_path, train, bench.teacher)
    table = load_conditions(teacher_path)
    data_path = os.path.join(bench.out, "data")
    write_data(data_path, train, table)
    scheduler = load_scheduler_config(teacher_path)
    scorer = Scorer(to_digits(train.x), train.y.numpy(), to_digits(held_out.x))
    labels = class_labels(bench.per_class)
    refs = _references(bench, teacher_path, table, labels, scheduler)
    setup = Setup(
        bench, train, held_out, teacher_path, data_path, table, scheduler, scorer, labels,
        refs, record,
    )  # fmt: skip
    # the real-vs-real floor: the train half against the held-out half; its accuracy is the
    # classifier's on the held-out half (on the train half it would be its training score)
    real = scorer(to_digits(train.x), train.y.numpy())
    real["accuracy"] = scorer.accuracy(to_digits(held_out.x), held_out.y.numpy())
    setup.rows["data"] = real | {"samples": len(train)}
    ref50 = refs[f"teacher {bench.teacher_steps}"]
    for name, x in refs.items():
        row = scorer(to_digits(x), labels.numpy())
        row["to_teacher"] = pixel_distance(x, ref50)
        setup.rows[name] = row | {"samples": len(x)}
    return setup


def distill_config(setup: Setup, output: str, seed: int, **settings: Any) -> DistillConfig:
    """The shipped defaults, then :data:`TOY_SETTINGS`, the benchmark's and the variant's."""
    merged = TOY_SETTINGS | setup.bench.distill | settings
    if setup.bench.cfg_scale != 1.0:
        merged.setdefault("true_cfg_scale", setup.bench.cfg_scale)
    return DistillConfig(
        data=setup.data_path, output=output, model=setup.teacher_path, seed=seed,
        progress=False, **merged,
    )  # fmt: skip


@contextlib.contextmanager
def _teacher_evaluations() -> Iterator[dict[str, int]]:
    """Count the teacher's evaluations (samples times passes) while the block runs."""
    counter = {"evaluations": 0}
    original = Teacher.__call__

    def counted(self: Teacher, z: Tensor, t: Tensor, **cond: Any) -> Tensor:
        counter["evaluations"] += z.shape[0] * (2 if self.true_cfg_scale != 1.0 else 1)
        return original(self, z, t, **cond)

    Teacher.__call__ = counted  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        Teacher.__call__ = original  # type: ignore[method-assign]


def _phases(output: str) -> dict[str, Any]:
    """When the run switched to the differential target, and how often the guard reverted."""
    with open(os.path.join(output, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    diff = [m["step"] for m in lines if m.get("phase") == "differential"]
    return {
        "switch_step": diff[0] if diff else None,
        "differential_steps": len(diff),
        "reverts": sum(1 for m in lines if m.get("rolled_back")),
        "final_loss": lines[-1]["loss"] if lines else None,
    }


def run_variant(
    setup: Setup, name: str, seed: int, settings: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Distil one variant at one seed (a fresh run folder), then sample and score it.

    Returns the row (``"steps"``: one score dict per student step count) and the samples
    ``{"student k": (N, 1, H, W)}``."""
    output = os.path.join(setup.bench.out, "runs", f"{name}-seed{seed}")
    if os.path.isdir(output):
        shutil.rmtree(output)  # an unfinished run of an interrupted invocation
    cfg = distill_config(setup, output, seed, **settings)
    start = time.perf_counter()
    with _teacher_evaluations() as counter:
        student = distill(cfg)
    seconds = time.perf_counter() - start
    student.eval()
    ref50 = setup.references[f"teacher {setup.bench.teacher_steps}"]
    row: dict[str, Any] = {
        "variant": name,
        "seed": seed,
        "settings": settings,
        "optimiser_steps": cfg.steps,
        "teacher_evaluations": counter["evaluations"],
        "seconds": seconds,
        "load_average": os.getloadavg()[0],
        **_phases(output),
        "steps": {},
    }
    samples = {}
    labels = setup.labels
    for k in STEPS:
        x = student_samples(
            student, setup.table, labels, steps=k, seed=setup.bench.eval_seed,
            scheduler=setup.scheduler,
        )  # fmt: skip
        scores = setup.scorer(to_digits(x), labels.numpy())
        scores["to_teacher"] = pixel_distance(x, ref50)
        row["steps"][str(k)] = scores
        samples[f"student {k}"] = x
    return row, samples


_COLUMNS = ("accuracy", "fd", "precision", "recall", "to_teacher")


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of scored sample sets (name -> scores)."""
    head = "| samples | accuracy | Fréchet distance | precision | recall | RMS to teacher 50 |"
    out = [head, "|---|---|---|---|---|---|"]
    for name, s in rows.items():
        cells = [f"{s[c]:.3f}" if c in s else "-" for c in _COLUMNS]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def write_results(
    setup: Setup, rows: dict[str, dict[str, Any]], samples: dict[str, Tensor], extra: dict
) -> None:
    """``results.json``, ``samples.safetensors`` (with ``labels``) and ``samples.png``."""
    out = Path(setup.bench.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "bench": dataclasses.asdict(setup.bench),
        "teacher": setup.teacher_record,
        "rows": rows,
        **extra,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    tensors = {"labels": setup.labels, "data": setup.train.x, "data_labels": setup.train.y}
    tensors |= {k.replace(" ", "_"): v.contiguous() for k, v in samples.items()}
    save_file(tensors, str(out / "samples.safetensors"))
    sets = {"data": (setup.train.x, setup.train.y)}
    sets |= {k: (v, setup.labels) for k, v in samples.items() if "seed 2" not in k}
    plot_grid(sets, out / "samples.png")


def run_bench(bench: BenchConfig) -> dict[str, Any]:
    """The default benchmark: one distillation with the shipped defaults, scored."""
    start = time.perf_counter()
    setup = prepare(bench)
    prepared = time.perf_counter() - start
    row, student = run_variant(setup, "default", 0, {})
    from .grid import record  # the grid's default variant at seed 0

    record(bench, setup.labels, "default", 0, row, student)
    rows = dict(setup.rows)
    rows |= {f"student {k}": s for k, s in row["steps"].items()}
    samples = dict(setup.references) | student
    total = time.perf_counter() - start
    extra = {"distillation": row, "seconds_prepare": prepared, "seconds_total": total}
    extra["load_average"] = os.getloadavg()
    write_results(setup, rows, samples, extra)
    return {"rows": rows, **extra}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mfcore.toys.digits",
        description="Distil a FLUX-transformer teacher of scikit-learn's digits through "
        "mfcore-distill and score it (docs/digits.md).",
    )
    p.add_argument("--out", default="runs/digits", help="output folder")
    p.add_argument("--cache", default=None, help="teacher cache (default $MFCORE_DIGITS_CACHE "
                   "or <out>/cache)")  # fmt: skip
    p.add_argument("--per-class", type=int, default=100, help="generated samples per class")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="teacher's two-pass CFG scale")
    p.add_argument("--grid", action="store_true", help="run the variants over seeds instead")
    p.add_argument("--only", nargs="*", default=None, help="--grid: these variants only")
    p.add_argument("--seeds", type=int, default=3, help="--grid: seeds per variant")
    p.add_argument(
        "--summarise", action="store_true", help="--grid: tabulate the finished runs only"
    )
    return p


def main(argv: list[str] | None = None) -> None:
    """Run the default benchmark (or ``--grid``) and print its table."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    bench = BenchConfig(
        out=args.out, cache=args.cache, per_class=args.per_class, cfg_scale=args.cfg_scale
    )
    if args.grid:
        from .grid import run_grid

        print(run_grid(bench, only=args.only, seeds=args.seeds, run=not args.summarise))
        return
    result = run_bench(bench)
    print(format_table(result["rows"]))
    d = result["distillation"]
    print(
        f"\ndistillation: {d['optimiser_steps']} steps, {d['teacher_evaluations']} teacher "
        f"evaluations, {d['seconds']:.0f} s; total {result['seconds_total']:.0f} s "
        f"(load average {result['load_average'][0]:.1f}); wrote {bench.out}/results.json"
    )
