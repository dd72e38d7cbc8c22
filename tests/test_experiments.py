"""The experiment runner and the verdict tables, on tiny configs (the real runs are slow)."""

from __future__ import annotations

import json

import pytest

from mfcore.toys import experiments, verdict
from mfcore.toys import verdict_converged as converged

TINY = dict(
    experiments.FAITHFUL,
    hidden=16,
    depth=2,
    teacher_fit_steps=20,
    steps=12,
    warmup_steps=4,
    signal_every=2,
    probe_every=4,
    batch=16,
    discrete_steps=1,
    eval_samples=32,
    teacher_steps=2,
)


def _run(w2_s, probe_s, w2_end, probe_end, collapsed=False, events=()):
    return {
        "collapsed": collapsed,
        "student": {"1": {"w2": w2_end, "mode_precision": 0.5}},
        "probe": None if probe_end is None else {"pooled": probe_end},
        "at_switch": {"w2_1": w2_s, "probe": {"pooled": probe_s}},
        "teacher_w2": 0.2,
        "teacher_net": {"w2": 0.2},
        "events": list(events),
    }


def test_ended_worse_and_blew_up():
    assert not verdict.ended_worse(_run(0.3, 0.2, 0.25, 0.15))
    assert not verdict.ended_worse(_run(0.3, 0.2, 0.31, 0.205))  # within the 5 % tolerance
    assert verdict.ended_worse(_run(0.3, 0.2, 0.25, 0.22))  # the probe rose
    assert verdict.ended_worse(_run(0.3, 0.2, 0.4, 0.15))  # W2 rose
    assert verdict.ended_worse(_run(0.3, 0.2, None, None, collapsed=True))
    assert not verdict.ended_worse(_run(float("nan"), 5.0, 90.0, 4.0))  # broken already at S
    assert verdict.blew_up(_run(0.3, 0.2, 1.01, 0.1)) and not verdict.blew_up(
        _run(0.3, 0.2, 0.9, 0.1)
    )


def test_runner_resumes_and_writes_every_table(tmp_path, monkeypatch):
    table = {
        "seed_method": {
            "ring8 / warm-up, fixed switch": dict(
                TINY, target="warmup", switch="fixed", guard=False
            ),
            "ring8 / warm-up, fixed switch, guarded": dict(
                TINY, target="warmup", switch="fixed", guard=True, rollback=True
            ),
            "ring8 / discrete only": dict(TINY, target="discrete"),
        },
        "hypotheses": {
            "ring8 / fd / warm-up": dict(
                TINY, target="warmup", switch="fixed", guard=False, jvp="fd"
            ),
            "ring8 / fd / discrete only": dict(TINY, target="discrete"),
        },
    }
    monkeypatch.setattr(experiments, "EXPERIMENTS", table)
    results = experiments.run_experiments(tmp_path, seeds=1)
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 4  # the two identical discrete-only configs ran once
    assert len(list((tmp_path / "teachers").glob("*.safetensors"))) == 1
    again = experiments.run_experiments(tmp_path, seeds=1)  # nothing left to run
    assert (tmp_path / "runs.jsonl").read_text().splitlines() == lines
    assert json.dumps(again, sort_keys=True, default=str) == json.dumps(
        results, sort_keys=True, default=str
    )
    text = verdict.tables(results)
    for head in ("Claim 1", "Guard and gate", "Agreement signals", "Hypotheses"):
        assert head in text
    row = results["seed_method"]["ring8 / warm-up, fixed switch"]["runs"][0]
    assert row["signals_at_switch"]["step"] < 4 and row["at_switch"]["step"] == 4


def test_cli_refuses_bad_counts(capsys):
    with pytest.raises(SystemExit) as exc:
        experiments.main(["--seeds", "0"])
    assert exc.value.code == 2


def _signalled(probe_end, delta, rho, seed=0):
    run = _run(0.3, 0.2, 0.25, probe_end) | {"seed": seed}
    run["signals_at_switch"] = {"agree_delta": delta, "agree_rho": rho, "agree_rho/0": rho}
    return run


def test_gate_calibration_counts_both_sides():
    """A switch helped when the run ends below its equal-cost discrete twin; each gate is
    counted on the runs where it helped and where it did not, held-out runs apart."""
    assert verdict.switch_helped(_signalled(0.1, 0, 0), _run(0, 0, 0, 0.2))
    assert not verdict.switch_helped(_signalled(0.3, 0, 0), _run(0, 0, 0, 0.2))
    assert not verdict.switch_helped(_signalled(float("nan"), 0, 0), _run(0, 0, 0, 0.2))
    twins = {"runs": [_run(0, 0, 0, 0.2) | {"seed": s} for s in range(3)]}
    results = {
        "claim1_shipped": {
            "ring8 / warm-up, fixed switch": {
                "runs": [
                    _signalled(0.1, 0.05, 1.2, seed=0),  # helped, default gate opens
                    _signalled(0.1, 0.8, 1.8, seed=1),  # helped, default gate stays shut
                    _signalled(0.5, 0.05, 1.0, seed=2),  # hurt, default gate opens
                ]
            },
            "ring8 / discrete only, equal teacher cost": twins,
            "aniso3d / warm-up, fixed switch": {"runs": [_signalled(0.5, 2.0, 5.0)]},
            "aniso3d / discrete only, equal teacher cost": twins,
        }
    }
    rows = verdict._calibration(results)
    assert "| calibration | (0.1, 1.5) | 1/2 | 1/1 |" in rows
    assert "| calibration | (inf, inf) | 2/2 | 1/1 |" in rows
    assert "| held out (aniso3d) | (1, 3) | 0/0 | 0/1 |" in rows
    assert "| held out (aniso3d) | (inf, inf) | 0/0 | 1/1 |" in rows


def test_converged_claim1_runs_branches_after_their_warm_up(tmp_path, monkeypatch):
    """claim1_converged at a tiny budget: the warm-ups run (and stop at their plateau) in a
    first phase, the branches start from them in a second; every table is written."""
    small = dict(TINY, discrete_steps=1, probe_every=4, plateau_window=4, signal_every=2)
    table = {}
    for name, cfg in experiments.CONVERGED_VARIANTS.items():
        c = {**cfg, **small}
        if c.get("warm_up_run"):
            c |= dict(steps=40, stop_plateau=0.5)
        elif "branch" in c:
            c |= dict(branch=(4, 4 + (c["branch"][1] - c["branch"][0]) // 200), blend_steps=4)
        else:
            c |= dict(warmup_steps=8, steps=16)
        table[f"ring8 / {name}"] = c
    monkeypatch.setattr(experiments, "EXPERIMENTS", {"claim1_converged": table})
    results = experiments.run_experiments(tmp_path, seeds=1)["claim1_converged"]
    warm = results[f"ring8 / {converged.WARMUP}"]["runs"][0]
    w = warm["steps_done"]
    assert warm["converged_at"] == w < 40
    assert (tmp_path / "warmups" / "ring8-0" / "checkpoint").is_dir()
    fixed = results["ring8 / fixed switch"]["runs"][0]
    assert fixed["steps_done"] == w + 14 and fixed["events"][0] == [w + 4, "switch"]
    assert fixed["probes"][: len(warm["probes"]) - 1] == warm["probes"][:-1]  # the shared curve
    assert fixed["signals_at_switch"] is not None  # measured on the branch before its switch
    alpha = results["ring8 / FM -> MF anneal (alpha-Flow)"]["runs"][0]
    assert alpha["events"][0] == [8, "switch"] and alpha["steps_done"] == 16
    text = verdict.tables({"claim1_converged": results})
    for head in ("plateau", "The switch and the curricula", "twins that could improve"):
        assert head in text, head
    assert "| calibration | (inf, inf) |" in text
    from mfcore.toys import plots

    plots.plot_converged(results, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_equal_cost_reads_the_reference_curve_between_its_probes():
    ref = {
        "probes": [[0, 1.0, 0.0], [10, 0.5, 40.0]],
        "probe": {"pooled": 0.25},
        "teacher_nfe_per_sample": 4.0,
        "steps_done": 20,
    }
    assert converged.equal_cost_probe(ref, 20.0) == pytest.approx(0.75)
    assert converged.equal_cost_probe(ref, 60.0) == pytest.approx(0.375)  # toward the end
    assert converged.equal_cost_probe(ref, 81.0) is None  # beyond the curve
    switched = _run(0.3, 0.4, 0.29, 0.3) | {"teacher_nfe_per_sample": 1.0, "steps_done": 60}
    assert converged.helped_at_equal_cost(switched, ref) is True  # 0.3 against 0.375 at cost 60
    worse = switched | {"probe": {"pooled": 0.4}}
    assert converged.helped_at_equal_cost(worse, ref) is False
    off_curve = switched | {"steps_done": 90}
    assert converged.helped_at_equal_cost(off_curve, ref) is None  # beyond the reference
    # improved: a lower probe than at the switch and a 1-step W2 no worse (5 %)
    assert converged.improved(switched) and not converged.improved(worse)
    assert not converged.improved(_run(0.3, 0.4, 0.4, 0.3))  # the W2 rose


def test_a_revert_is_false_when_its_unguarded_twin_improved():
    """The guard table counts a false revert where the unguarded twin ended better than at
    its switch: the count can come out non-zero."""

    def switched(seed, probe_end, w2_end, events):
        run = _run(0.3, 0.4, w2_end, probe_end) | {"seed": seed, "events": events}
        return run | {"steps_done": 100, "teacher_nfe_per_sample": 1.0, "probes": []}

    reverted = [[10, "switch"], [40, "revert"]]
    results = {
        "ring8 / fixed switch": {"runs": [switched(0, 0.35, 0.3, [[10, "switch"]]),
                                          switched(1, 0.5, 0.3, [[10, "switch"]])]},
        "ring8 / fixed switch, guarded": {"runs": [switched(0, 0.4, 0.3, reverted),
                                                   switched(1, 0.4, 0.3, reverted)]},
    }  # fmt: skip
    rows = converged._guard(converged._groups(results))
    # seed 0's twin improved (0.4 -> 0.35), seed 1's did not: one false revert of two
    assert rows[2].startswith("| ring8 / fixed switch, guarded | 2/2 | 30 ± 0 | 1/2 | 1/2 |")
