"""Tables of ``claim1_converged``: the switch after a converged warm-up, and the curricula.

Every run of a mixture and seed is compared with the discrete target on the same state:

- a *branch* (it starts from the converged warm-up at step ``W`` and switches at ``S``)
  against the ``discrete only`` branch of its seed;
- a *curriculum* (from the teacher-initialised student, switching at ``S``) against the
  warm-up run of its seed, which is the discrete target from step 0.

"At equal teacher cost" reads the discrete run's probe curve where it has spent the teacher
evaluations per sample the other run spent in all (linear between its probes). A switch
*helped* when the unguarded run ends with a lower probe error than the same schedule without
the switch at equal teacher cost: the ``discrete only`` branch for a branch, the
curriculum's ``no switch`` run for a curriculum (whose cost per step the switch leaves at
one teacher evaluation per sample). A twin *improved* when it ended with a lower probe error
than at its switch and a 1-step W2 no worse (within :data:`~mfcore.toys.verdict.TOL`): a
revert of its guarded twin was then a false one.
"""

from __future__ import annotations

from typing import Any

from .verdict import TOL, blew_up, count, ended_worse, finite, gate_table, stat

__all__ = ["WARMUP", "improved", "equal_cost_probe", "helped_at_equal_cost", "tables"]

WARMUP = "converged warm-up"
"""The variant holding each seed's warm-up run."""

UNGUARDED = ("fixed switch", "gap curriculum", "FM -> MF anneal (alpha-Flow)")
UNGUARDED += ("discrete MeanFlow curriculum",)
"""The switched variants; ``<name>, guarded`` is each one's guarded twin."""


def _cost(run: dict[str, Any]) -> float:
    """Teacher evaluations per sample the run spent in all (its warm-up's included)."""
    return run["teacher_nfe_per_sample"] * run["steps_done"]


def _probe_end(run: dict[str, Any]) -> float | None:
    return (run["probe"] or {}).get("pooled")


def equal_cost_probe(reference: dict[str, Any], cost: float) -> float | None:
    """``reference``'s pooled probe error where it had spent ``cost`` teacher evaluations per
    sample (linear between its probes; its final probe at its final cost); ``None`` outside
    its curve."""
    points = [(p[2], p[1]) for p in reference["probes"] if len(p) > 2]
    points.append((_cost(reference), _probe_end(reference)))
    points = [(c, e) for c, e in points if finite(c) and finite(e)]
    for (c0, e0), (c1, e1) in zip(points, points[1:], strict=False):
        if c0 <= cost <= c1:
            return e0 if c1 == c0 else e0 + (e1 - e0) * (cost - c0) / (c1 - c0)
    return None


def _probe_at_step(reference: dict[str, Any], step: int) -> float | None:
    hit = [p[1] for p in reference["probes"] if p[0] == step]
    if hit:
        return hit[0]
    return _probe_end(reference) if reference["steps_done"] == step else None


def improved(run: dict[str, Any]) -> bool:
    """Whether a run ended better than at its switch (see the module)."""
    at = run["at_switch"] or {}
    w2_s, probe_s = at.get("w2_1"), (at.get("probe") or {}).get("pooled")
    w2, probe = run["student"]["1"]["w2"], _probe_end(run)
    if run["collapsed"] or not all(finite(x) for x in (w2_s, probe_s, w2, probe)):
        return False
    return probe < probe_s and w2 <= (1 + TOL) * w2_s


def _groups(results: dict[str, Any]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{mixture: {variant: runs}}``."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, v in results.items():
        mixture, variant = name.split(" / ", 1)
        out.setdefault(mixture, {})[variant] = v["runs"]
    return out


def _reference(variants: dict[str, list[dict[str, Any]]], variant: str, seed: int):
    """The discrete run that ``variant``'s run of ``seed`` is compared with."""
    name = "discrete only" if variant in _BRANCHES else WARMUP
    return next((r for r in variants.get(name, []) if r["seed"] == seed), None)


_BRANCHES = ("discrete only", "discrete only, equal teacher cost", "fixed switch")
_BRANCHES += ("fixed switch, guarded", "gap curriculum", "gap curriculum, guarded")


def _without_switch(variants: dict[str, list[dict[str, Any]]], variant: str, seed: int):
    """The same schedule without the switch: what tells whether ``variant``'s switch helped."""
    name = "discrete only" if variant in _BRANCHES else f"{variant}, no switch"
    return next((r for r in variants.get(name, []) if r["seed"] == seed), None)


def _warmups(groups) -> list[str]:
    out = [
        "| mixture | converged at step | capped | probe at W | 1-step W2 at S | "
        "teacher evals / sample at W |",
        "|---|---|---|---|---|---|",
    ]
    for mixture, variants in groups.items():
        warm = variants.get(WARMUP, [])
        branch = variants.get("discrete only", [])
        capped = sum(r["converged_at"] is None for r in warm)
        out.append(
            f"| {mixture} | {stat([r['steps_done'] for r in warm], 0)} | {capped}/{len(warm)} | "
            f"{stat([_probe_end(r) for r in warm])} | "
            f"{stat([(r['at_switch'] or {}).get('w2_1') for r in branch])} | "
            f"{stat([_cost(r) for r in warm], 0)} |"
        )
    return out


def _outcomes(groups) -> list[str]:
    out = [
        "| mixture / variant | ended worse | blew up | 1-step W2 at S | 1-step W2 end | "
        "2-step W2 end | probe at S | probe end | discrete, equal steps | "
        "discrete, equal teacher cost | teacher evals / sample | s / run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mixture, variants in groups.items():
        for variant, runs in variants.items():
            if variant == WARMUP:
                continue
            refs = [(r, _reference(variants, variant, r["seed"])) for r in runs]
            steps = [None if f is None else _probe_at_step(f, r["steps_done"]) for r, f in refs]
            cost = [None if f is None else equal_cost_probe(f, _cost(r)) for r, f in refs]
            at = [r["at_switch"] or {} for r in runs]
            out.append(
                f"| {mixture} / {variant} | {count(runs, ended_worse)} | "
                f"{count(runs, blew_up)} | {stat([a.get('w2_1') for a in at])} | "
                f"{stat([r['student']['1']['w2'] for r in runs])} | "
                f"{stat([(r.get('two_step') or {}).get('w2') for r in runs])} | "
                f"{stat([(a.get('probe') or {}).get('pooled') for a in at])} | "
                f"{stat([_probe_end(r) for r in runs])} | {stat(steps)} | {stat(cost)} | "
                f"{stat([_cost(r) for r in runs], 0)} | {stat([r['wall_s'] for r in runs], 0)} |"
            )
    return out


def _switch_of(run) -> int | None:
    return next((s for s, k in run["events"] if k == "switch"), None)


def _revert_of(run) -> int | None:
    return next((s for s, k in run["events"] if k == "revert"), None)


def _guard(groups) -> list[str]:
    out = [
        "| mixture / variant | reverted | steps to detect | twins that improved | "
        "false reverts | twins that ended worse | probe end | twin's probe end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mixture, variants in groups.items():
        for name in UNGUARDED:
            guarded, twins = variants.get(f"{name}, guarded"), variants.get(name)
            if not guarded or not twins:
                continue
            by_seed = {r["seed"]: r for r in twins}
            reverted = [r for r in guarded if _revert_of(r) is not None]
            latency = [_revert_of(r) - _switch_of(r) for r in reverted]
            better = [r for r in twins if improved(r)]
            false = [r for r in reverted if r["seed"] in by_seed and improved(by_seed[r["seed"]])]
            out.append(
                f"| {mixture} / {name}, guarded | {len(reverted)}/{len(guarded)} | "
                f"{stat(latency, 0) if latency else '-'} | {len(better)}/{len(twins)} | "
                f"{len(false)}/{len(reverted)} | {count(twins, ended_worse)} | "
                f"{stat([_probe_end(r) for r in guarded])} | "
                f"{stat([_probe_end(r) for r in twins])} |"
            )
    return out


def helped_at_equal_cost(run: dict[str, Any], reference: dict[str, Any] | None) -> bool | None:
    """Whether ``run`` ended with a lower probe error than ``reference`` at equal teacher
    cost; ``None`` when that cannot be read."""
    end = _probe_end(run)
    ref = None if reference is None else equal_cost_probe(reference, _cost(run))
    if not finite(ref):
        return None
    return finite(end) and end < ref


def _calibration(groups) -> list[str]:
    rows: dict[str, list[tuple[bool, dict[str, float]]]] = {}
    for mixture, variants in groups.items():
        group = "held out (aniso3d)" if mixture == "aniso3d" else "calibration"
        for name in UNGUARDED:
            for r in variants.get(name, []):
                helped = helped_at_equal_cost(r, _without_switch(variants, name, r["seed"]))
                if r["signals_at_switch"] and helped is not None:
                    rows.setdefault(group, []).append((helped, r["signals_at_switch"]))
    return gate_table(rows)


def tables(results: dict[str, Any]) -> list[str]:
    """Markdown lines: the warm-ups, the outcomes, the guard and the gate's calibration."""
    groups = _groups(results)
    warm = any(WARMUP in variants for variants in groups.values())
    return [
        *(["#### The warm-up to its plateau", "", *_warmups(groups), ""] if warm else []),
        "#### The switch and the curricula",
        "",
        *_outcomes(groups),
        "",
        "#### The guard against twins that could improve",
        "",
        *_guard(groups),
        "",
        "#### The gate, on both sides",
        "",
        *_calibration(groups),
    ]
