"""Tables of :mod:`mfcore.toys.experiments`: the verdict on the seed method's claims.

A run *ends worse* than its state at the switch step ``S`` when it collapsed (a non-finite
loss or samples) or when its final 1-step W2 or its final probe error (against the exact
average velocity) exceeds the value at ``S`` by more than :data:`TOL`. Every variant is
judged at the same ``S``, the warm-up's switch step, including those that never switch.
A run *blew up* when its final 1-step W2 exceeds 5x the teacher network's.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from mfcore.solvers import SOLVERS

__all__ = [
    "TOL",
    "GATES",
    "ended_worse",
    "blew_up",
    "switch_helped",
    "gate_opens",
    "gate_table",
    "stat",
    "count",
    "finite",
    "tables",
]

TOL = 0.05
"""Relative rise of W2 or of the probe error that counts as ending worse."""

TWINS = {
    "warm-up, fixed switch, guarded": "warm-up, fixed switch",
    "warm-up, gated, guarded": "warm-up, fixed switch",
    "best hypothesis, guarded": "best hypothesis, fixed switch",
}
"""A guarded variant -> the unguarded one with the same seeds, to tell false reverts."""


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def ended_worse(run: dict[str, Any]) -> bool:
    """Whether a run ended worse than its own state at the switch step (see the module)."""
    final_w2, final_probe = run["student"]["1"]["w2"], (run["probe"] or {}).get("pooled")
    if run["collapsed"] or not (finite(final_w2) and finite(final_probe)):
        return True
    at = run["at_switch"] or {}
    w2_s, probe_s = at.get("w2_1"), (at.get("probe") or {}).get("pooled")
    if not (finite(w2_s) and finite(probe_s)):
        return False  # already broken at S: it cannot end worse than that
    return final_w2 > (1 + TOL) * w2_s or final_probe > (1 + TOL) * probe_s


def blew_up(run: dict[str, Any]) -> bool:
    """Final 1-step W2 above 5x the teacher network's (or the exact teacher's) W2."""
    w2 = run["student"]["1"]["w2"]
    ref = (run.get("teacher_net") or {}).get("w2") or run["teacher_w2"]
    return run["collapsed"] or not finite(w2) or w2 > 5.0 * ref


def stat(values: list[Any], digits: int = 3) -> str:
    vals = [v for v in values if finite(v)]
    if not vals:
        return "n/a"
    mean = statistics.fmean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    big = abs(mean) >= 1000
    text = f"{mean:.3g} ± {sd:.2g}" if big else f"{mean:.{digits}f} ± {sd:.{digits}f}"
    return text + ("" if len(vals) == len(values) else f" ({len(vals)})")


def _at(run, key):
    at = run["at_switch"] or {}
    return at.get("w2_1") if key == "w2" else (at.get("probe") or {}).get("pooled")


def _end(run, key):
    return run["student"]["1"]["w2"] if key == "w2" else (run["probe"] or {}).get("pooled")


def count(runs, fn) -> str:
    return f"{sum(map(fn, runs))}/{len(runs)}"


def _seed_method(results: dict[str, Any]) -> list[str]:
    out = [
        "| mixture / variant | ended worse | blew up | 1-step W2 at S | 1-step W2 end | "
        "probe at S | probe end | 1-step prec. end | teacher NFE / sample |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in results.items():
        runs = v["runs"]
        out.append(
            f"| {name} | {count(runs, ended_worse)} | {count(runs, blew_up)} | "
            f"{stat([_at(r, 'w2') for r in runs])} | {stat([_end(r, 'w2') for r in runs])} | "
            f"{stat([_at(r, 'probe') for r in runs])} | "
            f"{stat([_end(r, 'probe') for r in runs])} | "
            f"{stat([r['student']['1']['mode_precision'] for r in runs])} | "
            f"{stat([r['teacher_nfe_per_sample'] for r in runs], 2)} |"
        )
    return out


def _switch_of(run) -> int | None:
    return next((s for s, k in run["events"] if k == "switch"), None)


def _revert_of(run) -> int | None:
    return next((s for s, k in run["events"] if k == "revert"), None)


def _max_bin(signals: dict[str, float] | None, what: str) -> float | None:
    if not signals:
        return None
    vals = [v for k, v in signals.items() if k.startswith(f"agree_{what}/")]
    return max(vals) if vals else None


def _signal_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Unguarded runs that switched at a fixed step, with their signals at the switch."""
    rows = []
    for exp in ("seed_method", "hypotheses"):
        for name, v in results.get(exp, {}).items():
            cfg = v["config"]
            if cfg.get("target") != "warmup" or cfg.get("guard") or cfg.get("switch") != "fixed":
                continue
            rows += [(f"{exp}: {name}", r) for r in v["runs"] if r["signals_at_switch"]]
    return rows


def _signals(results: dict[str, Any]) -> list[str]:
    rows = _signal_rows(results)
    if not rows:
        return []
    out = [
        "| runs (unguarded, fixed switch) | n | ended worse | delta | rho | max bin rho | drift |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[str, list[dict[str, Any]]] = {}
    for name, r in rows:
        mixture = name.split(": ", 1)[1].split(" / ")[0]
        groups.setdefault("held out (aniso3d)" if mixture == "aniso3d" else "calibration", [])
        groups["held out (aniso3d)" if mixture == "aniso3d" else "calibration"].append(r)
    for label, runs in groups.items():
        sig = [r["signals_at_switch"] for r in runs]
        out.append(
            f"| {label} | {len(runs)} | {count(runs, ended_worse)} | "
            f"{stat([s['agree_delta'] for s in sig], 2)} | "
            f"{stat([s['agree_rho'] for s in sig], 2)} | "
            f"{stat([_max_bin(s, 'rho') for s in sig], 2)} | "
            f"{stat([s['agree_drift'] for s in sig], 2)} |"
        )
    worse = [r for _, r in rows if ended_worse(r)]
    better = [r for _, r in rows if not ended_worse(r)]

    def opened(r, delta=0.1, rho=1.5):
        s = r["signals_at_switch"]
        bins_ok = all(v <= rho for k, v in s.items() if k.startswith("agree_rho/")) and all(
            v <= delta for k, v in s.items() if k.startswith("agree_delta/")
        )
        return s["agree_delta"] <= delta and s["agree_rho"] <= rho and bins_ok

    runs = [r for _, r in rows]
    rho_gt1 = [r for r in runs if r["signals_at_switch"]["agree_rho"] > 1.0]
    out += [
        "",
        f"rho > 1 at the switch in {len(rho_gt1)} of {len(rows)} runs; "
        f"{sum(map(ended_worse, rho_gt1))} of those ended worse. "
        f"{len(worse)} runs ended worse, {len(better)} did not. "
        f"The default gate (delta <= 0.1, rho <= 1.5, pooled and per bin) would have opened "
        f"for {sum(map(opened, runs))} of the {len(runs)} (of which "
        f"{sum(ended_worse(r) for r in runs if opened(r))} ended worse).",
    ]
    return out


def _guard(results: dict[str, Any], exp: str = "seed_method") -> list[str]:
    runs_by: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name, v in results.get(exp, {}).items():
        if v["config"].get("guard") and v["config"].get("target") == "warmup":
            runs_by[name] = [(name, r) for r in v["runs"]]
    if not runs_by:
        return []
    seed_method = results[exp]
    out = [
        "| variant | gate opened | reverted | steps to detect | false reverts | ended worse "
        "than at S | probe end | discrete-only probe end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, pairs in runs_by.items():
        mixture, variant = name.split(" / ", 1)
        unguarded = seed_method.get(f"{mixture} / {TWINS.get(variant, '')}")
        runs = [r for _, r in pairs]
        switched = [r for r in runs if _switch_of(r) is not None]
        reverted = [r for r in runs if _revert_of(r) is not None]
        latency = [_revert_of(r) - _switch_of(r) for r in reverted]
        false = 0
        if unguarded:
            twins = {u["seed"]: u for u in unguarded["runs"]}
            false = sum(
                1 for r in reverted if r["seed"] in twins and not ended_worse(twins[r["seed"]])
            )
        disc = seed_method.get(f"{mixture} / discrete only", {"runs": []})["runs"]
        out.append(
            f"| {name} | {len(switched)}/{len(runs)} | {len(reverted)}/{len(runs)} | "
            f"{stat(latency, 0) if latency else '-'} | {false} | "
            f"{count(runs, ended_worse)} | {stat([_end(r, 'probe') for r in runs])} | "
            f"{stat([_end(r, 'probe') for r in disc])} |"
        )
    return out


GATES = ((0.1, 1.5), (0.5, 2.0), (1.0, 2.0), (1.0, 3.0), (math.inf, math.inf))
"""(delta_max, rho_max) settings the calibration table tries: the default first, the last
always open."""


def gate_opens(signals: dict[str, float], delta: float, rho: float) -> bool:
    """Whether ``SwitchGate(delta, rho)`` would open on these signals (pooled and per bin)."""
    bins = all(v <= rho for k, v in signals.items() if k.startswith("agree_rho/")) and all(
        v <= delta for k, v in signals.items() if k.startswith("agree_delta/")
    )
    return signals["agree_delta"] <= delta and signals["agree_rho"] <= rho and bins


def switch_helped(run: dict[str, Any], twin: dict[str, Any]) -> bool:
    """Whether a run that switched ended with a lower probe error than its discrete-only twin
    at equal teacher cost (same mixture and seed)."""
    end, ref = _end(run, "probe"), _end(twin, "probe")
    return finite(end) and finite(ref) and end < ref


def _calibration(results: dict[str, Any], exp: str = "claim1_shipped") -> list[str]:
    """The gate on both sides: per setting, how often it opens on the unguarded fixed-switch
    runs where switching helped at equal teacher cost (it should) and where it did not."""
    runs = results.get(exp, {})
    rows: dict[str, list[tuple[bool, dict[str, float]]]] = {}
    for name, v in runs.items():
        mixture, variant = name.split(" / ", 1)
        if variant != "warm-up, fixed switch":
            continue
        equal_cost = runs[f"{mixture} / discrete only, equal teacher cost"]["runs"]
        twins = {r["seed"]: r for r in equal_cost}
        group = "held out (aniso3d)" if mixture == "aniso3d" else "calibration"
        for r in v["runs"]:
            if r["signals_at_switch"] and r["seed"] in twins:
                rows.setdefault(group, []).append(
                    (switch_helped(r, twins[r["seed"]]), r["signals_at_switch"])
                )
    return gate_table(rows) if rows else []


def gate_table(rows: dict[str, list[tuple[bool, dict[str, float]]]]) -> list[str]:
    """The gate's calibration table: per group of runs and per setting of :data:`GATES`, how
    often it opens on the signals of the switches that helped (it should) and of those that
    did not; ``rows`` maps a group to ``(helped, signals at the switch)`` pairs."""
    out = [
        "| runs | gate (delta, rho) | opens where switching helped | opens where it did not |",
        "|---|---|---|---|",
    ]
    for group, pairs in rows.items():
        helped = [s for h, s in pairs if h]
        hurt = [s for h, s in pairs if not h]
        for delta, rho in GATES:
            yes = sum(gate_opens(s, delta, rho) for s in helped)
            no = sum(gate_opens(s, delta, rho) for s in hurt)
            out.append(
                f"| {group} | ({delta:g}, {rho:g}) | {yes}/{len(helped)} | {no}/{len(hurt)} |"
            )
    return out


def _hypotheses(results: dict[str, Any]) -> list[str]:
    if "hypotheses" not in results:
        return []
    out = [
        "| mixture / setting | warm-up ended worse | probe at S | warm-up probe end | "
        "discrete-only probe end | warm-up 1-step W2 end | discrete-only 1-step W2 end |",
        "|---|---|---|---|---|---|---|",
    ]
    h = results["hypotheses"]
    for name, v in h.items():
        if not name.endswith(" / warm-up"):
            continue
        base = name[: -len(" / warm-up")]
        warm, disc = v["runs"], h[f"{base} / discrete only"]["runs"]
        out.append(
            f"| {base} | {count(warm, ended_worse)} | {stat([_at(r, 'probe') for r in warm])} | "
            f"{stat([_end(r, 'probe') for r in warm])} | "
            f"{stat([_end(r, 'probe') for r in disc])} | "
            f"{stat([_end(r, 'w2') for r in warm])} | {stat([_end(r, 'w2') for r in disc])} |"
        )
    return out


def _metric_table(results: dict[str, Any], exp: str) -> list[str]:
    cols = ("w2", "mode_precision", "mode_recall")
    out = [
        "| variant | steps | " + " | ".join(cols) + " | ms / step |",
        "|" + "---|" * (len(cols) + 3),
    ]
    for name, v in results[exp].items():
        runs = v["runs"]
        ms = stat([r["ms_per_step"] for r in runs])
        for k in ("1", "2"):
            cells = " | ".join(stat([r["student"][k][c] for r in runs]) for c in cols)
            out.append(f"| {name} | {k} | {cells} | {ms} |")
    return out


def teacher_evals_per_sample(config: dict[str, Any]) -> float:
    """Teacher evaluations per sample and step of a run's discrete target, as the target now
    runs (only the pairs ``r < t`` integrated, each solve's first stage from ``v``):
    ``1 + P(r < t) (stages x steps - 1)``; the runs log the count of the code they ran."""
    stages = SOLVERS[config.get("discrete_method", "heun")].stages
    equal = config.get("equal_fraction", 0.25) * (1.0 - config.get("grid_fraction", 0.5))
    return 1.0 + (1.0 - equal) * (stages * config.get("discrete_steps", 16) - 1)


def _recipe(results: dict[str, Any], exp: str = "recipe") -> list[str]:
    cols = ("w2", "mode_precision", "mode_recall")
    out = [
        "| mixture / recipe | steps | teacher evals / sample | "
        + " | ".join(f"1-step {c}" for c in cols)
        + " | "
        + " | ".join(f"2-step {c}" for c in cols)
        + " | probe error |",
        "|" + "---|" * (2 * len(cols) + 4),
    ]
    for name, v in results[exp].items():
        runs, cfg = v["runs"], v["config"]
        one = " | ".join(stat([r["student"]["1"][c] for r in runs]) for c in cols)
        two = " | ".join(stat([r["student"]["2"][c] for r in runs]) for c in cols)
        probe = stat([(r["probe"] or {}).get("pooled") for r in runs])
        cost = teacher_evals_per_sample(cfg)
        out.append(f"| {name} | {cfg['steps']} | {cost:.2f} | {one} | {two} | {probe} |")
    return out


def _old_warmup(results: dict[str, Any]) -> list[str]:
    out = [
        "| variant | collapsed | 1-step W2 | teacher W2 | 1-step mode prec. |",
        "|---|---|---|---|---|",
    ]
    for name, v in results["warmup"].items():
        runs = v["runs"]
        collapsed = sum(
            r["collapsed"]
            or not finite(r["student"]["1"]["w2"])
            or r["student"]["1"]["w2"] > 5.0 * r["teacher_w2"]
            for r in runs
        )
        out.append(
            f"| {name} | {collapsed}/{len(runs)} | "
            f"{stat([r['student']['1']['w2'] for r in runs])} | "
            f"{stat([r['teacher_w2'] for r in runs])} | "
            f"{stat([r['student']['1']['mode_precision'] for r in runs])} |"
        )
    return out


def tables(results: dict[str, Any]) -> str:
    """Markdown tables (mean ± standard deviation over seeds) of the experiments' results."""
    parts: list[str] = []
    if "recipe" in results:
        parts += ["### The shipped recipe", "", *_recipe(results), ""]
    if "ode_steps" in results:
        parts += ["### The discrete target's step count", "", *_recipe(results, "ode_steps"), ""]
    if "claim1_shipped" in results:
        parts += ["### Claim 1 in the shipped recipe", ""]
        parts += _seed_method(results["claim1_shipped"])
        parts += ["", "### Guard in the shipped recipe", "", *_guard(results, "claim1_shipped")]
        parts += ["", "### The gate's calibration", "", *_calibration(results), ""]
    if "claim1_converged" in results:
        from .verdict_converged import tables as converged_tables

        parts += ["### Claim 1 after a converged warm-up, and the curricula", ""]
        parts += [*converged_tables(results["claim1_converged"]), ""]
    if "guard_twins" in results:
        from .verdict_converged import tables as converged_tables

        parts += ["### The guard against twins in MeanFlow's own pairs", ""]
        parts += [*converged_tables(results["guard_twins"]), ""]
    if "seed_method" in results:
        parts += ["### Claim 1 in the faithful setting", "", *_seed_method(results["seed_method"])]
        parts += ["", "### Guard and gate", "", *_guard(results)]
    sig = _signals(results)
    if sig:
        parts += ["", "### Agreement signals at the switch against the outcome", "", *sig]
    hyp = _hypotheses(results)
    if hyp:
        parts += ["", "### Hypotheses (item 4)", "", *hyp]
    if "alignment_teacher_init" in results:
        parts += ["", "### Claim 2 in the faithful setting", ""]
        parts += _metric_table(results, "alignment_teacher_init")
    if "warmup" in results:
        parts += ["", "### Random init: warm-up (first version)", "", *_old_warmup(results)]
    for exp in ("alignment", "critics"):
        if exp in results:
            parts += [
                "",
                f"### Random init: {exp} (first version)",
                "",
                *_metric_table(results, exp),
            ]
    return "\n".join(parts) + "\n"
