"""The three experiments of docs/toys.md, over 5 seeds each; writes JSON and Markdown tables.

1. **warm-up**: differential target from scratch vs discrete only vs warm-up then
   differential, in a hard setting (plain L2, no adaptive weight, a large learning rate, the
   25-mode grid, no alignment). A run *collapses* when its loss goes non-finite
   (``MeanFlowLoss`` raises ``FloatingPointError``) or its final 1-step W2 exceeds 5x the
   teacher's.
2. **alignment**: the same student with and without trajectory alignment (fake-velocity
   critic), evaluated at 1 and 2 steps on both presets; mean-seeking shows as a lower mode
   precision.
3. **critics**: fake-velocity vs mean-flow vs kernel critic: quality and milliseconds per
   training step (the "fake" runs are those of experiment 2).

The budgets are smaller than the default run's so that everything fits in about 30 minutes
on 2 CPU cores. Run ``python -m mfcore.toys.experiments [--out runs/experiments]
[--seeds 5]``; it writes ``results.json``, ``tables.md`` and ``experiments.png`` in the
output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

from .train import run

__all__ = ["EXPERIMENTS", "run_experiments", "tables", "main"]

logger = logging.getLogger(__name__)

_COMMON = dict(
    out_dir=None,
    figures=False,
    progress=False,
    eval_samples=1000,
    eval_steps=(1, 2),
    discrete_steps=16,
    lr=3e-3,
    grid_fraction=0.5,
    blend_steps=0,
)

_WARMUP_BASE = dict(
    _COMMON,
    preset="grid25",
    steps=600,
    warmup_steps=300,
    align="none",
    discrete_p=0.0,
    adaptive_p=0.0,
    grad_clip=None,
    lr=1e-2,
)

_ALIGN_BASE = dict(_COMMON, steps=1000, target="discrete", align_start=200, align_weight=0.3)

EXPERIMENTS: dict[str, dict[str, dict[str, Any]]] = {
    "warmup": {
        "differential only": dict(_WARMUP_BASE, target="differential"),
        "discrete only": dict(_WARMUP_BASE, target="discrete"),
        "warm-up -> differential": dict(_WARMUP_BASE, target="warmup"),
    },
    "alignment": {
        f"{p} / {a}": dict(_ALIGN_BASE, preset=p, align=a)
        for p in ("ring8", "grid25")
        for a in ("none", "fake")
    },
    "critics": {
        f"ring8 / {c}": dict(_ALIGN_BASE, preset="ring8", align=c)
        for c in ("none", "fake", "meanflow", "kernel")
    },
}
"""Experiment -> variant -> config overrides of :class:`~mfcore.toys.train.ToyConfig`."""


def _one(config: dict[str, Any], seed: int, cache: dict[str, dict]) -> dict[str, Any]:
    key = json.dumps({**config, "seed": seed}, sort_keys=True, default=str)
    if key not in cache:
        res = run({**config, "seed": seed})
        cache[key] = {
            "seed": seed,
            "teacher_w2": res["teacher"]["w2"],
            "student": res["student"],
            "collapsed": res["training"]["collapsed"],
            "collapse": res["training"]["collapse"],
            "ms_per_step": res["training"]["ms_per_step"],
        }
    return cache[key]


def run_experiments(seeds: int = 5, only: list[str] | None = None) -> dict[str, Any]:
    """Run every variant of :data:`EXPERIMENTS` (or those in ``only``) for ``seeds`` seeds."""
    cache: dict[str, dict] = {}
    out: dict[str, Any] = {}
    for exp, variants in EXPERIMENTS.items():
        if only and exp not in only:
            continue
        out[exp] = {}
        for name, config in variants.items():
            start = time.perf_counter()
            runs = [_one(config, seed, cache) for seed in range(seeds)]
            out[exp][name] = {"config": config, "runs": runs}
            logger.info("%s / %s: %.0f s", exp, name, time.perf_counter() - start)
    return out


def _stat(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "n/a"
    mean = statistics.fmean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}" + ("" if len(vals) == len(values) else f" ({len(vals)})")


def _collapsed(r: dict) -> bool:
    w2 = r["student"]["1"]["w2"]
    return r["collapsed"] or w2 is None or w2 > 5.0 * r["teacher_w2"]


def tables(results: dict[str, Any]) -> str:
    """Markdown tables (mean ± std over seeds) of :func:`run_experiments`'s results."""
    parts = []
    cols = ("w2", "mode_precision", "mode_recall")
    if "warmup" in results:
        parts.append("| variant | collapsed | 1-step W2 | teacher W2 | 1-step mode prec. |")
        parts.append("|---|---|---|---|---|")
        for name, v in results["warmup"].items():
            runs = v["runs"]
            parts.append(
                f"| {name} | {sum(map(_collapsed, runs))}/{len(runs)} | "
                f"{_stat([r['student']['1']['w2'] for r in runs])} | "
                f"{_stat([r['teacher_w2'] for r in runs])} | "
                f"{_stat([r['student']['1']['mode_precision'] for r in runs])} |"
            )
        parts.append("")
    for exp in ("alignment", "critics"):
        if exp not in results:
            continue
        head = "| variant | steps | " + " | ".join(cols) + " | ms / step |"
        parts += [head, "|" + "---|" * (len(cols) + 3)]
        for name, v in results[exp].items():
            runs = v["runs"]
            ms = _stat([r["ms_per_step"] for r in runs])
            for k in ("1", "2"):
                cells = " | ".join(_stat([r["student"][k][c] for r in runs]) for c in cols)
                parts.append(f"| {name} | {k} | {cells} | {ms} |")
        parts.append("")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    """Run the experiments and write ``results.json`` and ``tables.md``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/experiments")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--only", nargs="*", choices=sorted(EXPERIMENTS), default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run_experiments(args.seeds, args.only)
    results["wall_s"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "tables.md").write_text(tables(results))
    from . import plots

    plots.plot_experiments(results, out / "experiments.png")
    print(tables(results))
    print(f"total {results['wall_s']:.0f} s; wrote {out}/results.json and tables.md")


if __name__ == "__main__":
    main()
