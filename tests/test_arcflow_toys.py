"""The ArcFlow toy comparison on a tiny seeded budget: structure, pairing, training helps."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mfcore.arcflow import ArcFlowStudent, ArcParams, arc_velocity
from mfcore.toys.arcflow_experiment import (
    METHODS,
    ArcFlowMLP,
    ArcFlowToyConfig,
    compare,
    main,
    markdown_table,
    train_arcflow,
)
from mfcore.toys.gmm import preset

TINY = ArcFlowToyConfig(presets=("ring8",), seeds=(0, 1), steps=150, batch=128, eval_samples=300)
REPORTED = ("w2", "mode_precision", "mode_recall", "mmd")


@pytest.fixture(scope="module")
def tiny_run():
    return compare(TINY)


def test_results_structure_and_json(tiny_run):
    results, extras = tiny_run
    json.loads(json.dumps(results))  # serialisable as written
    assert results["config"]["steps"] == 150
    assert results["meanflow_config"]["steps"] == 150  # the same update budget
    assert tuple(results["meanflow_config"]["eval_steps"]) == (2,)
    res = results["presets"]["ring8"]
    assert set(res["summary"]) == set(METHODS) == set(res["per_seed"])
    for method in METHODS:
        rows = res["per_seed"][method]
        assert [row["seed"] for row in rows] == [0, 1]
        for m in REPORTED:
            stat = res["summary"][method][m]
            values = [row[m] for row in rows]
            assert stat["n"] == 2
            assert stat["mean"] == pytest.approx(sum(values) / 2)
            assert stat["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
        assert 0.0 <= res["summary"][method]["mode_recall"]["mean"] <= 1.0
    assert set(res["ms_per_step"]) == {"arcflow", "meanflow", "meanflow_align"}
    # the MeanFlow baselines were evaluated on the same noise and data as ArcFlow
    assert res["paired_evaluation"] is True
    # the first seed's trajectories: ArcFlow's 2 calls with 16 closed-form substeps each
    traj = extras["ring8"]["trajectories"]
    assert traj["arcflow"].shape == (33, 300, 2) and traj["teacher_euler"].shape == (3, 300, 2)
    torch.testing.assert_close(traj["arcflow"][-1], extras["ring8"]["samples"]["arcflow"])


def test_trained_arcflow_beats_the_untrained_student(tiny_run):
    res = tiny_run[0]["presets"]["ring8"]["per_seed"]
    for trained, untrained in zip(res["arcflow"], res["arcflow_untrained"], strict=True):
        assert trained["w2"] < 0.8 * untrained["w2"]


def test_markdown_table_lists_every_method(tiny_run):
    table = markdown_table(tiny_run[0])
    assert table.count("| ArcFlow | 2 |") == 1 and "MeanFlow + alignment" in table
    assert "±" in table and "**ring8**" in table


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 5), k=st.integers(1, 3), s=st.floats(0.0, 1.0))
def test_student_is_an_arcflow_student_with_the_right_shapes(b, k, s):
    net = ArcFlowMLP(hidden=16, depth=2, num_components=k).double()
    assert isinstance(net, ArcFlowStudent)
    z = torch.randn(b, 2, dtype=torch.float64)
    s0 = torch.full((b,), s, dtype=torch.float64)
    p = net(z, s0)
    assert isinstance(p, ArcParams) and p.m.shape == (b, k, 2) and p.weights.shape == (b, k, 1)
    # at s = s0 the mixture's velocity is sum_k pi_k m_k
    torch.testing.assert_close(arc_velocity(p, s0), (p.weights * p.m).sum(1))


def test_training_is_seeded():
    cfg = ArcFlowToyConfig(steps=5, batch=16, hidden=16, depth=2)
    a, _ = train_arcflow(cfg, preset("ring8"), seed=3)
    b, _ = train_arcflow(cfg, preset("ring8"), seed=3)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_errors():
    with pytest.raises(ValueError, match="presets"):
        compare(ArcFlowToyConfig(presets=("moons",)))
    with pytest.raises(ValueError, match="steps"):
        compare(ArcFlowToyConfig(steps=0))
    with pytest.raises(ValueError, match="mix_start"):
        compare(ArcFlowToyConfig(mix_start=2.0))
    with pytest.raises(ValueError, match="workers"):
        compare(TINY, workers=0)
    with pytest.raises(ValueError, match=r"z must have shape \(B, 2\)"):
        ArcFlowMLP()(torch.zeros(3, 3), torch.ones(3))
    with pytest.raises(ValueError, match="s0"):
        ArcFlowMLP()(torch.zeros(3, 2), torch.ones(2))


def test_command_line_writes_json_table_and_figures(tmp_path):
    out = tmp_path / "r.json"
    argv = ["--presets", "ring8", "--seeds", "1", "--steps", "3", "--eval-samples", "50"]
    main([*argv, "--workers", "1", "--json", str(out), "--figures", str(tmp_path / "f")])
    results = json.loads(out.read_text())
    assert results["command"].endswith("--figures " + str(tmp_path / "f"))
    assert "| ArcFlow | 2 |" in out.with_suffix(".md").read_text()
    assert (tmp_path / "f" / "arcflow_trajectories.png").stat().st_size > 1000
    assert (tmp_path / "f" / "arcflow_samples.png").stat().st_size > 1000
