"""The toy distillation: run(config)'s documented keys and files, the CLI's smoke run, config
errors, collapse reporting, and (slow) the default run's quality criteria on both presets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mfcore.toys.gmm import GaussianMixture
from mfcore.toys.nets import FourierPoints, MeanFlowMLP, VelocityMLP
from mfcore.toys.train import METRIC_KEYS, ToyConfig, main, run, summary_table

TINY = dict(
    steps=12,
    target="warmup",
    batch=32,
    hidden=32,
    critic_hidden=16,
    warmup_steps=6,
    align_start=4,
    critic_lead=2,
    discrete_steps=2,
    eval_samples=64,
    teacher_steps=4,
    progress=False,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return run(dict(TINY, out_dir=str(out), name="tiny"))


def _check_metrics(m: dict) -> None:
    assert set(METRIC_KEYS) <= set(m)
    for key in METRIC_KEYS:
        assert isinstance(m[key], float) and math.isfinite(m[key])
    assert 0.0 <= m["mode_precision"] <= 1.0 and 0.0 <= m["mode_recall"] <= 1.0


def test_run_returns_the_documented_keys(tiny_run):
    assert {"config", "teacher", "data_floor", "student", "training", "run_dir"} <= set(tiny_run)
    assert tiny_run["teacher"]["nfe"] == 2 * TINY["teacher_steps"]
    _check_metrics(tiny_run["teacher"])
    _check_metrics(tiny_run["data_floor"])
    assert sorted(tiny_run["student"]) == ["1", "2", "4"]
    for k, m in tiny_run["student"].items():
        assert m["nfe"] == int(k)
        _check_metrics(m)
    training = tiny_run["training"]
    assert training["switch_step"] == TINY["warmup_steps"]
    assert not training["collapsed"] and training["steps_done"] == TINY["steps"]
    assert {"align_1", "align_2", "critic_1"} <= set(training["history"][-1])


def test_run_writes_metrics_and_figures(tiny_run):
    run_dir = tiny_run["run_dir"]
    saved = json.loads((Path(run_dir) / "metrics.json").read_text())
    assert saved["student"] == tiny_run["student"]
    for name in ("samples.png", "trajectories.png", "losses.png"):
        path = Path(run_dir) / name
        assert path.stat().st_size > 1000


def test_summary_table_lists_every_row(tiny_run):
    table = summary_table(tiny_run)
    for label in ("data floor", "teacher", "student 1-step", "student 4-step", "warm-up switch"):
        assert label in table


def test_run_accepts_any_gaussian_mixture_teacher():
    teacher = GaussianMixture.isotropic(torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.5, 0.0]]), 0.3)
    res = run(dict(TINY, out_dir=None, align="kernel", eval_steps=(1,)), teacher=teacher)
    assert list(res["student"]) == ["1"] and res["run_dir"] is None
    _check_metrics(res["student"]["1"])


def test_cli_smoke_run(tmp_path, capsys):
    main(
        [
            "--steps",
            "6",
            "--batch",
            "32",
            "--eval-samples",
            "64",
            "--align",
            "none",
            "--out",
            str(tmp_path),
            "--name",
            "cli",
            "--no-figures",
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert "student 1-step" in printed and "metrics.json" in printed
    saved = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert saved["config"]["steps"] == 6 and saved["config"]["align"] == "none"


def test_non_finite_teacher_is_reported_as_a_collapse():
    class NaNTeacher(GaussianMixture):
        # non-finite on training batches only (the discrete target's solve sees the rows
        # with r < t of one), so the evaluation (64 samples) can still run
        def velocity(self, z, t, **cond):
            if z.shape[0] <= TINY["batch"]:
                return torch.full_like(z, float("nan"))
            return super().velocity(z, t, **cond)

    teacher = NaNTeacher(torch.zeros(1, 2), torch.ones(1))
    res = run(dict(TINY, out_dir=None, align="none", eval_steps=(1,)), teacher=teacher)
    assert res["training"]["collapsed"] and res["training"]["steps_done"] == 0
    assert (
        "not finite" in res["training"]["collapse"] or "non-finite" in res["training"]["collapse"]
    )


def test_config_errors():
    with pytest.raises(ValueError, match="unknown config keys"):
        run({"stepz": 3})
    with pytest.raises(ValueError, match="target"):
        run({"target": "jvp"})
    with pytest.raises(ValueError, match="align"):
        run(ToyConfig(align="gan"))
    with pytest.raises(ValueError, match="steps"):
        run({"steps": 0})
    with pytest.raises(ValueError, match="eval_steps"):
        run({"eval_steps": ()})
    with pytest.raises(TypeError, match="config"):
        run("default")
    with pytest.raises(TypeError, match="teacher"):
        run(dict(TINY, out_dir=None), teacher=lambda z, t: z)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ring8", "grid25"])
def test_default_run_meets_the_quality_criteria(name):
    res = run(ToyConfig(preset=name, out_dir=None, figures=False, progress=False))
    one = res["student"]["1"]
    assert one["mode_recall"] == 1.0
    assert one["mode_precision"] >= 0.95
    assert one["w2"] <= 1.5 * res["teacher"]["w2"]


def test_networks_check_inputs_and_keep_shapes():
    net = MeanFlowMLP(2, hidden=8, depth=1, point_features=4)
    z, t = torch.randn(5, 2), torch.rand(5)
    assert net(z, 0.5 * t, t).shape == (5, 2)
    assert VelocityMLP(2, hidden=8).forward(z, t).shape == (5, 2)
    assert torch.equal(FourierPoints(2, 0)(z), z)
    with pytest.raises(ValueError, match="z must have shape"):
        net(torch.randn(5, 3), t, t)
    with pytest.raises(ValueError, match="act"):
        MeanFlowMLP(2, act="tanh")


# --------------------------------------------------------------------------- resume


def test_a_resumed_run_continues_exactly(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import mfcore.toys.loop as loop
    import mfcore.toys.train as toy

    # the warm-up switch fires at step 6 (its guard keeps a held-out batch), the critics
    # start at step 4: a checkpoint at step 8 holds all of that
    cfg = dict(TINY, out_dir=str(tmp_path), figures=False, save_every=4)
    full = run(dict(cfg, name="full"))
    real, calls = loop.train_step, []

    def killed_after_9(*args, **kwargs):
        if len(calls) == 9:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", killed_after_9)
    with pytest.raises(KeyboardInterrupt):
        run(dict(cfg, name="killed"))
    monkeypatch.setattr(loop, "train_step", real)
    assert toy.read_checkpoint(ToyConfig(**dict(cfg, name="killed")))["step"] == 8
    resumed = run(dict(cfg, name="killed", resume=True, progress=True))
    assert resumed["student"] == full["student"]
    for key in ("history", "probes", "events", "switch_step", "teacher_points", "steps_done"):
        assert resumed["training"][key] == full["training"][key], key
    a = load_file(str(tmp_path / "full" / "student.safetensors"))
    b = load_file(str(tmp_path / "killed" / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings_and_a_missing_checkpoint(tmp_path, capsys):
    import mfcore.toys.train as toy

    cfg = dict(TINY, out_dir=str(tmp_path), name="r", figures=False, steps=4)
    run(cfg)
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.003 -> 0.01\)"):
        run(dict(cfg, resume=True, lr=0.01))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        toy.read_checkpoint(ToyConfig(**dict(cfg, name="none", resume=True)))
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path), "--name", "none", "--resume", "--quiet"])
    assert exc.value.code == 2 and "no checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------- branches


def test_a_warm_up_stops_at_its_plateau_and_branches_share_it(tmp_path):
    """stop_plateau ends a run where its probe stopped falling; a branch (init_from) starts
    from that run's student, optimiser, step, teacher evaluations and probe curve."""
    warm = dict(TINY, target="discrete", align="none", out_dir=str(tmp_path), name="warm")
    warm |= dict(figures=False, steps=40, probe_every=2, plateau_window=4, save_every=0)
    # a probe that falls by less than 1000 % over 4 steps: a plateau at the first check
    done = run(dict(warm, stop_plateau=10.0))
    tr = done["training"]
    assert tr["converged_at"] == 8 and tr["steps_done"] == 8
    never = run(dict(warm, name="never", stop_plateau=None))
    assert never["training"]["converged_at"] is None and never["training"]["steps_done"] == 40
    # a branch that runs no step is the run it starts from
    same = dict(warm, out_dir=None, name=None, init_from=str(tmp_path / "warm"), steps=8)
    branch = run(same)
    assert branch["student"] == done["student"]  # one process, the same weights: equal
    assert branch["training"]["teacher_points"] == tr["teacher_points"]
    assert branch["training"]["probes"] == [p for p in tr["probes"] if p["step"] < 8]
    # a branch with a switch continues from there, and counts on from the warm-up's cost
    switched = run(dict(same, target="warmup", switch="fixed", warmup_steps=10, steps=14))
    assert switched["training"]["switch_step"] == 10
    assert switched["training"]["at_switch"]["step"] == 10
    assert switched["training"]["teacher_points"] > tr["teacher_points"]
    assert [p["step"] for p in switched["training"]["probes"]][-4:] == [6, 8, 10, 12]


def test_a_branch_refuses_another_run_and_a_missing_checkpoint(tmp_path):
    warm = dict(TINY, target="discrete", align="none", out_dir=str(tmp_path), name="warm")
    run(dict(warm, figures=False, steps=4, save_every=0))
    branch = dict(TINY, align="none", init_from=str(tmp_path / "warm"), steps=8)
    with pytest.raises(
        ValueError, match=r"init_from: .* another run \(preset: 'ring8' -> 'grid25'"
    ):
        run(dict(branch, preset="grid25"))
    with pytest.raises(ValueError, match="stopped at step 4 > steps"):
        run(dict(branch, steps=2))
    with pytest.raises(FileNotFoundError, match="init_from: no checkpoint"):
        run(dict(branch, init_from=str(tmp_path / "none")))
    with pytest.raises(ValueError, match="plateau_window"):
        run(dict(TINY, stop_plateau=0.1, plateau_window=5, probe_every=2))
    with pytest.raises(ValueError, match="curriculum"):
        run(dict(TINY, curriculum="cosine"))
    with pytest.raises(ValueError, match="handover"):
        run(dict(TINY, handover="fade"))
    with pytest.raises(TypeError, match="init_from"):
        run(dict(TINY, init_from=3))
