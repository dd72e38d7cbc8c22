"""The toy experiments of docs/toys.md, over several seeds; writes JSON lines and Markdown tables.

The seed method's claims, in the faithful setting (a teacher *network* fitted to the exact
field, the student grown from it, the exact average velocity as the reference):

- ``seed_method``: claim 1 on ring8, grid25 and the held-out ``aniso3d``, 5 seeds: the
  differential target alone, warm-up then differential at a fixed switch (the paper), the
  same guarded (gate, guard, rollback), discrete only, discrete at the warm-up's teacher
  cost, and the best setting of ``hypotheses``;
- ``hypotheses``: the issue's item 4 on ring8 and grid25, 2 seeds: every discrete target
  (teacher ODE at 1, 2, 16 steps; the split target), finite-difference ``du/dt``, low time
  frequencies, derivative supervision, tangent normalisation, the adaptive weight, a lower
  learning rate with clipping and a blended switch, each warm-up against its own discrete-only
  run;
- ``alignment_teacher_init``: claim 2 re-measured in the faithful setting (discrete target,
  with and without the fake-velocity critic), 5 seeds.

And the earlier random-init experiments (``warmup``, ``alignment``, ``critics``).

Every run is appended to ``runs.jsonl`` as it finishes, keyed by its config and seed, so an
interrupted invocation resumes where it stopped; teacher networks are fitted once per
mixture and frequency and cached in ``teachers/``. Run
``python -m mfcore.toys.experiments --out runs/experiments [--only seed_method] [--jobs 2]``;
:mod:`mfcore.toys.verdict` turns the results into the tables of docs/toys.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mfcore._checks import cli_int

from .gmm import preset
from .nets import VelocityMLP
from .teacher_net import fit_teacher_net
from .train import ToyConfig, run, teacher_net_config

__all__ = ["EXPERIMENTS", "SEEDS", "FAITHFUL", "run_experiments", "main"]

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- the configs

FAITHFUL: dict[str, Any] = dict(
    teacher="net",
    init="teacher",
    act="silu",
    hidden=256,
    depth=3,
    time_max_freq=32.0,
    lr=1e-3,
    lr_final=1e-3,
    grad_clip=None,
    discrete_p=0.0,
    adaptive_p=0.0,
    discrete_steps=8,
    align="none",
    steps=1500,
    warmup_steps=500,
    eval_samples=1000,
    eval_steps=(1, 2),
    probe_every=100,
    out_dir=None,
    figures=False,
    progress=False,
)
"""The faithful setting: the student grown from a fitted teacher network, plain L2, a fixed
learning rate, the switch (and every variant's reference state) at step 500 of 1500."""

BEST: dict[str, Any] = dict(time_max_freq=2.0, jvp="fd", fd_step=0.2, lr=3e-4, lr_final=3e-4)
"""The mildest differential phase the hypotheses found (low time frequencies, a coarse
finite-difference ``du/dt``, a lower learning rate); see docs/toys.md."""

_GUARDED = dict(guard=True, rollback=True)

SEED_VARIANTS: dict[str, dict[str, Any]] = {
    "differential only": dict(target="differential"),
    "warm-up, fixed switch": dict(target="warmup", switch="fixed", guard=False),
    "warm-up, fixed switch, guarded": dict(target="warmup", switch="fixed", **_GUARDED),
    "warm-up, gated, guarded": dict(target="warmup", switch="gated", **_GUARDED),
    "discrete only": dict(target="discrete"),
    "discrete only, equal teacher cost": dict(target="discrete", discrete_steps=3),
    "best hypothesis, fixed switch": dict(BEST, target="warmup", switch="fixed", guard=False),
    "best hypothesis, guarded": dict(BEST, target="warmup", switch="fixed", **_GUARDED),
}

_WARM = dict(target="warmup", switch="fixed", guard=False)
HYPOTHESES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (warm-up overrides, the discrete-only overrides it is judged against)
    "teacher ODE, Heun-1": (dict(discrete_steps=1), dict(discrete_steps=1)),
    "teacher ODE, Heun-2": (dict(discrete_steps=2), dict(discrete_steps=2)),
    "teacher ODE, Heun-8": (dict(), dict()),
    "teacher ODE, Heun-16": (dict(discrete_steps=16), dict(discrete_steps=16)),
    "split target, Euler-1 + student": (
        dict(discrete="split", discrete_steps=1, discrete_method="euler"),
        dict(discrete="split", discrete_steps=1, discrete_method="euler"),
    ),
    "fd du/dt, h = 0.05": (dict(jvp="fd", fd_step=0.05), dict()),
    "fd du/dt, h = 0.2": (dict(jvp="fd", fd_step=0.2), dict()),
    "time features up to 2": (dict(time_max_freq=2.0), dict(time_max_freq=2.0)),
    "derivative supervision (w = 1)": (dict(deriv_weight=1.0), dict()),
    "derivative supervision (w = 10), features up to 2": (
        dict(deriv_weight=10.0, time_max_freq=2.0),
        dict(time_max_freq=2.0),
    ),
    "tangent normalisation (c = 0.1)": (dict(tangent_norm=0.1), dict()),
    "adaptive weight (p = 1)": (dict(adaptive_p=1.0), dict()),
    "lr 1e-4, clip 1": (
        dict(lr=1e-4, lr_final=1e-4, grad_clip=1.0),
        dict(lr=1e-4, lr_final=1e-4, grad_clip=1.0),
    ),
    "blended switch (200 steps)": (dict(blend_steps=200), dict()),
    "best: features up to 2, fd h = 0.2, lr 3e-4": (
        BEST,
        {k: BEST[k] for k in BEST if k != "jvp" and k != "fd_step"},
    ),
}

PRESETS = ("ring8", "grid25", "aniso3d")

SHIPPED: dict[str, Any] = dict(
    FAITHFUL,
    target="warmup",
    switch="gated",
    guard=True,
    rollback=True,
    warmup_steps=200,
    discrete_steps=4,
    discrete_method="heun",
    discrete_p=1.0,
    adaptive_p=1.0,
    grad_clip=1.0,
    lr=1e-4,
    lr_final=1e-4,
    times="logit_normal",
    time_mean=-0.4,
    time_std=1.0,
    equal_fraction=0.75,
    grid_fraction=0.0,
    steps=2000,
    probe_every=250,
)
"""``mfcore-distill``'s recipe (``DistillConfig``'s defaults before the recipe experiment) in
the faithful toy: logit-normal(-0.4, 1) times with 75 % ``r = t``, the adaptive weight
``p = 1``, a constant lr 1e-4, clipping at 1, the Heun-4 discrete target behind the gated and
guarded switch at step 200 (no EMA: the toy trainer has none)."""

RECIPES: dict[str, dict[str, Any]] = {
    "shipped (MeanFlow pairs), lr 1e-4": dict(),
    "shipped, lr 1e-3": dict(lr=1e-3, lr_final=1e-3),
    "+ 25 % grid pairs, lr 1e-4": dict(grid_fraction=0.25),
    "+ 25 % grid pairs, lr 1e-3": dict(grid_fraction=0.25, lr=1e-3, lr_final=1e-3),
    "+ 50 % grid pairs, lr 1e-3": dict(grid_fraction=0.5, lr=1e-3, lr_final=1e-3),
    "toy job's pairs (uniform, 25 % r = t, 50 % grid), lr 1e-3": dict(
        times="uniform", equal_fraction=0.25, grid_fraction=0.5, lr=1e-3, lr_final=1e-3
    ),
}
"""The time-pair distribution and learning rate of the shipped recipe against the toy job's
(issue 19, item 1): grid pairs are the intervals of the 1- and 2-step sampling grids."""


SHIPPED_NOW: dict[str, Any] = dict(
    SHIPPED, grid_fraction=0.25, steps=4000, warmup_steps=2000, probe_every=250
)
"""``mfcore-distill``'s recipe as it now ships (a quarter grid pairs), with a warm-up of
2,000 steps (where the recipe experiment's discrete runs were still improving) and as
many steps after it."""

_EQUAL_COST_STEPS = 2000 + round(2000 / 4.06)
"""Steps of discrete-only that cost what 2,000 discrete then 2,000 differential steps cost:
the Heun-4 target spends 4.06 teacher evaluations per sample and step with the shipped
pairs, the differential target 1."""

CLAIM1_VARIANTS: dict[str, dict[str, Any]] = {
    "discrete only": dict(target="discrete"),
    "discrete only, equal teacher cost": dict(target="discrete", steps=_EQUAL_COST_STEPS),
    "warm-up, fixed switch": dict(target="warmup", switch="fixed", guard=False),
    "warm-up, fixed switch, guarded": dict(target="warmup", switch="fixed", **_GUARDED),
    "differential only": dict(target="differential"),
}
"""Claim 1 in the shipped recipe (issue 19, items 3-7): the switch against the discrete
target at equal steps and at equal teacher cost, guarded and not. (The gated switch is
judged from the unguarded runs' signals at the switch: the calibration table.)"""


MAX_WARMUP = 16000
"""The longest warm-up of ``claim1_converged``: it stops earlier at its plateau."""

PLATEAU = 0.02
"""A warm-up has converged when its probe error fell by under 2 % over the last 1,000 steps
(the criterion of the issue's pilot)."""

BRANCH = 2000
"""Steps of ``claim1_converged``'s branches after their switch step."""

LEAD = 100
"""Discrete steps a branch runs before its switch step, so the gate's signals are measured
on the branch itself (every ``signal_every`` steps)."""

CURRICULUM = 2000
"""Steps of a curriculum from the teacher-initialised student before its switch."""

_CONVERGED_BASE: dict[str, Any] = dict(SHIPPED_NOW, probe_every=250, save_every=0)

WARMUP_RUN: dict[str, Any] = dict(
    _CONVERGED_BASE, target="discrete", steps=MAX_WARMUP, stop_plateau=PLATEAU, warm_up_run=True
)
"""``claim1_converged``'s warm-up: the discrete target until its plateau, saved for the
branches (``warm_up_run`` and ``branch`` are experiment keys, resolved by :func:`_resolve`)."""

_BRANCH_EQUAL_COST = round(BRANCH / 4.06)
"""Discrete steps that cost what ``BRANCH`` differential steps cost (4.06 against 1 teacher
evaluation per sample and step)."""

_BRANCH_BASE = dict(_CONVERGED_BASE, branch=(LEAD, LEAD + BRANCH))
"""A branch from the converged warm-up: ``(steps before the switch, steps in all)`` after it."""

_CURRICULUM_BASE = dict(_CONVERGED_BASE, warmup_steps=CURRICULUM, steps=CURRICULUM + BRANCH)
"""A curriculum from the teacher-initialised student, switching at ``CURRICULUM``."""


def _switched(name: str, base: dict[str, Any], **overrides: Any) -> dict[str, dict[str, Any]]:
    """``name`` (unguarded) and ``name, guarded``: a fixed switch, without and with the guard."""
    run = dict(base, switch="fixed", **overrides)
    return {name: dict(run, guard=False), f"{name}, guarded": run}


CONVERGED_VARIANTS: dict[str, dict[str, Any]] = {
    "converged warm-up": WARMUP_RUN,
    "discrete only": dict(_BRANCH_BASE, target="discrete"),
    "discrete only, equal teacher cost": dict(
        _CONVERGED_BASE, target="discrete", branch=(LEAD, LEAD + _BRANCH_EQUAL_COST)
    ),
    **_switched("fixed switch", _BRANCH_BASE),
    **_switched("gap curriculum", _BRANCH_BASE, handover="gap", blend_steps=1000),
    **_switched("FM -> MF anneal (alpha-Flow)", _CURRICULUM_BASE, curriculum="alpha"),
    **_switched("discrete MeanFlow curriculum", _CURRICULUM_BASE, curriculum="dmf"),
    "FM -> MF anneal (alpha-Flow), no switch": dict(
        _CURRICULUM_BASE, target="discrete", curriculum="alpha"
    ),
    "discrete MeanFlow curriculum, no switch": dict(
        _CURRICULUM_BASE, target="discrete", curriculum="dmf"
    ),
}
"""Claim 1 after a converged warm-up, and the curricula (issue 19, items 3-7): each switch
unguarded and guarded, against the discrete target at equal steps and teacher cost. The
``SHIPPED_NOW`` base switches gated and guarded; the variants here fix the switch step."""


_TWINS_EQUAL_COST = 500 + round(1500 / 2.75)
"""Discrete steps that cost what 500 discrete then 1,500 differential steps cost (2.75
against 1 teacher evaluation per sample and step with MeanFlow's pairs)."""

_TWINS_BASE: dict[str, Any] = dict(SHIPPED, warmup_steps=500, steps=2000, probe_every=100)

TWIN_VARIANTS: dict[str, dict[str, Any]] = {
    "discrete only": dict(target="discrete"),
    "discrete only, equal teacher cost": dict(target="discrete", steps=_TWINS_EQUAL_COST),
    "fixed switch": dict(switch="fixed", guard=False),
    "fixed switch, guarded": dict(switch="fixed"),
}
"""The recipe where the issue's audit saw the differential phase refine (MeanFlow's own
pairs, no grid pairs, lr 1e-4, the switch at step 500): twins that can improve, so that the
guard's false reverts can be counted (issue 19, item 7)."""


def _hypotheses() -> dict[str, dict[str, Any]]:
    out = {}
    for p in ("ring8", "grid25"):
        for name, (warm, disc) in HYPOTHESES.items():
            out[f"{p} / {name} / warm-up"] = dict(FAITHFUL, preset=p, **_WARM, **warm)
            out[f"{p} / {name} / discrete only"] = dict(
                FAITHFUL, preset=p, target="discrete", **disc
            )
    return out


# the random-init experiments of the first version of docs/toys.md
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
    guard=False,
)
_ALIGN_BASE = dict(
    _COMMON,
    steps=1000,
    target="discrete",
    align_start=200,
    align_weight=0.3,
    critic_updates=2,
    align_batch=None,
)

EXPERIMENTS: dict[str, dict[str, dict[str, Any]]] = {
    "ode_steps": {
        f"{p} / Heun-{k}{'' if n == 2000 else f', {n} steps'}": dict(
            SHIPPED, preset=p, grid_fraction=0.25, discrete_steps=k, steps=n
        )
        for p in ("ring8", "grid25")
        for k, n in ((1, 2000), (2, 2000), (4, 2000), (8, 2000), (1, 5600), (2, 3500))
    },
    "recipe": {
        f"{p} / {v}": dict(SHIPPED, preset=p, **o) for p in PRESETS for v, o in RECIPES.items()
    },
    "claim1_shipped": {
        f"{p} / {v}": dict(SHIPPED_NOW, preset=p, **o)
        for p in PRESETS
        for v, o in CLAIM1_VARIANTS.items()
    },
    "guard_twins": {
        f"{p} / {v}": {**_TWINS_BASE, "preset": p, **o}
        for p in PRESETS
        for v, o in TWIN_VARIANTS.items()
    },
    "claim1_converged": {
        f"{p} / {v}": dict(o, preset=p) for p in PRESETS for v, o in CONVERGED_VARIANTS.items()
    },
    "seed_method": {
        f"{p} / {v}": dict(FAITHFUL, preset=p, **o)
        for p in PRESETS
        for v, o in SEED_VARIANTS.items()
    },
    "alignment_teacher_init": {
        f"{p} / {a}": dict(
            FAITHFUL,
            preset=p,
            target="discrete",
            align=a,
            align_start=200,
            align_weight=0.3,
            critic_updates=2,
            align_batch=None,
        )
        for p in PRESETS
        for a in ("none", "fake")
    },
    "hypotheses": _hypotheses(),
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

SEEDS = {
    "seed_method": 5,
    "hypotheses": 2,
    "alignment_teacher_init": 5,
    "recipe": 2,
    "ode_steps": 2,
    "claim1_shipped": 3,
    "claim1_converged": 5,
    "guard_twins": 5,
}
"""Seeds per experiment (5 where not listed)."""

# ----------------------------------------------------------------------------- running


def _key(config: dict[str, Any], seed: int) -> str:
    return json.dumps({**config, "seed": seed}, sort_keys=True, default=str)


_EXPERIMENT_KEYS = ("warm_up_run", "branch")


def _resolve(config: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
    """The :class:`ToyConfig` fields of a variant: a ``warm_up_run`` is written to
    ``out/warmups/<preset>-<seed>``; a ``branch=(lead, total)`` starts from that run at its
    last step ``W``, switches at ``W + lead`` and stops at ``W + total``."""
    config = dict(config)
    folder = out / "warmups" / f"{config.get('preset', 'ring8')}-{seed}"
    if config.pop("warm_up_run", False):
        return dict(config, out_dir=str(folder.parent), name=folder.name)
    branch = config.pop("branch", None)
    if branch is None:
        return config
    done = json.loads((folder / "metrics.json").read_text())["training"]["steps_done"]
    lead, total = branch
    return dict(config, init_from=str(folder), warmup_steps=done + lead, steps=done + total)


def _teacher(config: dict[str, Any], folder: Path) -> VelocityMLP | None:
    """The fitted teacher network of a config, from ``folder`` or fitted and stored there."""
    cfg = ToyConfig(**{k: v for k, v in config.items() if k not in _EXPERIMENT_KEYS})
    if cfg.teacher != "net":
        return None
    tcfg = teacher_net_config(cfg)
    gmm = preset(cfg.preset)
    name = "-".join(f"{v}" for v in (cfg.preset, *dataclasses.asdict(tcfg).values()))
    path = folder / f"{name}.safetensors"
    net = VelocityMLP(
        gmm.dim, tcfg.hidden, tcfg.depth, tcfg.features, max_freq=tcfg.max_freq, act=tcfg.act
    )
    if path.exists():
        net.load_state_dict(load_file(path))
        return net.eval().requires_grad_(False)
    net = fit_teacher_net(gmm, tcfg)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), path)
    return net


def _signals_at(history: list[dict[str, Any]], step: int | None) -> dict[str, float] | None:
    """The last agreement signals logged before ``step``."""
    if step is None:
        return None
    rows = [h for h in history if h["step"] < step and "agree_rho" in h]
    if not rows:
        return None
    return {k: v for k, v in rows[-1].items() if k.startswith("agree_") or k == "step"}


def _one(job: tuple[str, dict[str, Any], int, str]) -> dict[str, Any]:
    key, config, seed, teachers = job
    torch.set_num_threads(1)
    start = time.perf_counter()
    net = _teacher(config, Path(teachers))
    res = run({**_resolve(config, seed, Path(teachers).parent), "seed": seed}, teacher_net=net)
    tr = res["training"]
    switch = next((s for s, k in tr["events"] if k == "switch"), None)
    return {
        "key": key,
        "seed": seed,
        "teacher_w2": res["teacher"]["w2"],
        "teacher_net": res["teacher_net"]
        and {
            "velocity_rel_error": res["teacher_net"]["velocity_rel_error"],
            **res["teacher_net"]["samples"],
        },
        "student": res["student"],
        "probe": res["probe"],
        "collapsed": tr["collapsed"],
        "collapse": tr["collapse"],
        "at_switch": tr["at_switch"],
        "events": tr["events"],
        "signals_at_switch": _signals_at(tr["history"], switch or config.get("warmup_steps")),
        "probes": [
            [p["step"], p["pooled"], p.get("teacher_points", 0) / res["config"]["batch"]]
            for p in tr["probes"]
        ],
        "converged_at": tr["converged_at"],
        "steps_done": tr["steps_done"],
        "two_step": res["student"].get("2"),
        "guard": [
            [h["step"], h["guard_error"], h["guard_ref"]]
            for h in tr["history"]
            if "guard_error" in h
        ],
        "ms_per_step": tr["ms_per_step"],
        "teacher_nfe_per_sample": tr["teacher_nfe_per_sample"],
        "wall_s": time.perf_counter() - start,
    }


def _load(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["key"]] = row
    return out


def _map(todo: list[tuple[str, dict[str, Any], int, str]], jobs: int):
    """The rows of ``todo``'s runs as they finish, in ``jobs`` processes."""
    if jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(jobs) as pool:
            yield from pool.map(_one, todo)
    else:
        yield from map(_one, todo)


def run_experiments(
    out: Path, only: list[str] | None = None, seeds: int | None = None, jobs: int = 1
) -> dict[str, Any]:
    """Run every variant of :data:`EXPERIMENTS` (or those in ``only``), resuming from
    ``out/runs.jsonl``; returns ``{experiment: {variant: {"config", "runs"}}}``."""
    out.mkdir(parents=True, exist_ok=True)
    done_path = out / "runs.jsonl"
    done = _load(done_path)
    chosen = [e for e in EXPERIMENTS if not only or e in only]
    plan: dict[str, dict[str, list[str]]] = {}
    todo: dict[str, tuple[str, dict[str, Any], int, str]] = {}
    for exp in chosen:
        n = seeds if seeds is not None else SEEDS.get(exp, 5)
        plan[exp] = {}
        for name, config in EXPERIMENTS[exp].items():
            keys = [_key(config, s) for s in range(n)]
            plan[exp][name] = keys
            for s, k in zip(range(n), keys, strict=True):
                if k not in done:
                    todo[k] = (k, config, s, str(out / "teachers"))
    # teachers first, one process, so parallel runs never fit the same one twice
    for job in todo.values():
        _teacher(job[1], out / "teachers")
    logger.info("%d runs to do, %d already done", len(todo), len(plan) and len(done))
    # branches last: they start from a warm-up run of the first phase
    phases = [
        [j for j in todo.values() if "branch" not in j[1]],
        [j for j in todo.values() if "branch" in j[1]],
    ]
    with done_path.open("a") as log:
        for phase in phases:
            for row in _map(phase, jobs):
                log.write(json.dumps(row) + "\n")
                log.flush()
                done[row["key"]] = row
    return {
        exp: {
            name: {"config": EXPERIMENTS[exp][name], "runs": [done[k] for k in keys]}
            for name, keys in variants.items()
        }
        for exp, variants in plan.items()
    }


def main(argv: list[str] | None = None) -> None:
    """Run the experiments, then write ``results.json`` and ``tables.md``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/experiments")
    p.add_argument("--only", nargs="*", choices=sorted(EXPERIMENTS), default=None)
    p.add_argument("--seeds", type=cli_int, default=None, help="seeds per variant (default: SEEDS)")
    p.add_argument("--jobs", type=cli_int, default=1, help="runs in parallel (processes)")
    args = p.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    start = time.perf_counter()
    results = run_experiments(out, args.only, args.seeds, args.jobs)
    from .verdict import tables

    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    text = tables(results)
    (out / "tables.md").write_text(text)
    from . import plots

    plots.plot_experiments(results, out / "experiments.png")
    if "claim1_converged" in results:
        plots.plot_converged(results["claim1_converged"], out / "claim1_converged.png")
    print(text)
    print(f"total {time.perf_counter() - start:.0f} s; wrote {out}/results.json and tables.md")


if __name__ == "__main__":
    main()
