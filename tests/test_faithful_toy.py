"""The faithful toy of the seed-method issue: a teacher network fitted to the exact field, a
student grown from it (equal at init), the probe against the exact average velocity, and
the toy job's switch, guard, rollback and derivative supervision wired end to end."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mfcore.solvers import odeint
from mfcore.toys.derivative import derivative_loss
from mfcore.toys.gmm import GaussianMixture, preset
from mfcore.toys.nets import IntervalStudent, VelocityMLP
from mfcore.toys.probe import AverageVelocityProbe
from mfcore.toys.teacher_net import TeacherNetConfig, fit_teacher_net, teacher_net_report
from mfcore.toys.train import run
from mfcore.warmup import gap_bin_names


@pytest.fixture(scope="module")
def ring():
    return preset("ring8")


@pytest.fixture(scope="module")
def small_teacher(ring):
    return fit_teacher_net(ring, TeacherNetConfig(hidden=32, depth=2, steps=150, batch=256))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(2.0, 64.0))
def test_the_student_equals_the_teacher_bit_for_bit_at_init(seed, max_freq):
    torch.manual_seed(seed % 1000)
    teacher = VelocityMLP(2, hidden=16, depth=2, max_freq=max_freq)
    student = IntervalStudent(teacher)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(32, 2, generator=gen)
    t = torch.rand(32, generator=gen)
    r = t * torch.rand(32, generator=gen)
    assert torch.equal(student(z, r, t), teacher(z, t))
    # ... and the interval input is trainable: one step moves it off zero
    loss = student(z, r, t).pow(2).sum()
    loss.backward()
    assert student.interval.weight.grad is not None
    assert float(student.interval.weight.grad.abs().sum()) > 0


def test_the_student_is_a_copy(small_teacher):
    student = IntervalStudent(small_teacher)
    with torch.no_grad():
        student.net[0].weight.add_(1.0)
    z, t = torch.randn(4, 2), torch.rand(4)
    assert not torch.equal(student(z, t, t), small_teacher(z, t))
    with pytest.raises(TypeError, match="VelocityMLP"):
        IntervalStudent(torch.nn.Linear(2, 2))


def test_the_teacher_fit_lowers_the_velocity_error(ring, small_teacher):
    report = teacher_net_report(small_teacher, ring, samples=256)
    untrained = VelocityMLP(2, hidden=32, depth=2)
    before = teacher_net_report(untrained, ring, samples=256)
    assert report["velocity_rel_error"] < 0.9 * before["velocity_rel_error"]
    assert set(report["samples"]) >= {"w2", "mode_precision", "mode_recall", "nfe"}
    assert len(report["velocity_rel_error_bins"]) == 4
    with pytest.raises(ValueError, match="max_freq"):
        TeacherNetConfig(max_freq=0.0)


def test_the_probe_is_exact_on_the_exact_field():
    gmm = GaussianMixture.isotropic(torch.tensor([[1.0, 0.5], [-1.0, 0.0]]), std=0.4)
    probe = AverageVelocityProbe(gmm, per_bin=16, seed=3)
    assert probe.z.dtype == torch.float64 and probe.exact.shape == (64, 2)
    assert bool((probe.r <= probe.t).all()) and bool((probe.t <= 1).all())

    def fine(z, r, t):  # an independent solve: 4x the probe's steps, uniform grid
        z_r = odeint(gmm.velocity, z.double(), t.double(), r.double(), 1024, method="rk4")
        return (z.double() - z_r) / (t.double() - r.double())[:, None]

    errors = probe.errors(fine(probe.z, probe.r, probe.t))
    assert set(errors) == {"pooled", *gap_bin_names()}
    assert errors["pooled"] < 1e-6
    # the instantaneous velocity is a poor 1-step map: the long-gap bin sees it
    crude = probe.errors(gmm.velocity(probe.z, probe.t))
    assert crude["gap<=1"] > 0.05 and crude["gap<=0.05"] < crude["gap<=1"]


def test_derivative_loss_is_zero_for_the_exact_field():
    gmm = GaussianMixture.isotropic(torch.tensor([[0.5, 0.0]]), std=0.5)
    probe = AverageVelocityProbe(gmm, per_bin=8)
    z, r, t = probe.z, probe.r, probe.t
    keep = (t - r) > 1e-3
    z, r, t = z[keep], r[keep], t[keep]

    def exact(z, r, t):
        z_r = odeint(gmm.velocity, z, t, r, 256, method="rk4")
        return (z - z_r) / (t - r)[:, None]

    v = gmm.velocity(z, t)
    loss = derivative_loss(exact, z, r, t, v, exact(z, r, t))
    assert float(loss) < 1e-8


TINY = dict(
    teacher="net",
    init="teacher",
    act="silu",
    hidden=32,
    depth=2,
    teacher_fit_steps=60,
    steps=24,
    batch=32,
    warmup_steps=8,
    signal_every=4,
    probe_every=8,
    discrete_steps=2,
    discrete_p=0.0,
    adaptive_p=0.0,
    align="none",
    eval_samples=64,
    eval_steps=(1, 2),
    teacher_steps=4,
    out_dir=None,
    figures=False,
    progress=False,
)


def test_faithful_run_records_the_switch_state_the_probe_and_the_teacher(small_teacher):
    cfg = dict(TINY, target="warmup", switch="fixed", guard=False, grid_fraction=0.0)
    res = run(cfg, teacher_net=small_teacher)
    tr = res["training"]
    assert tr["at_switch"]["step"] == 8 and math.isfinite(tr["at_switch"]["w2_1"])
    assert set(tr["at_switch"]["probe"]) == {"pooled", *gap_bin_names()}
    assert [p["step"] for p in tr["probes"]] == [0, 8, 16]
    assert tr["events"] == [[8, "switch"]]
    assert res["probe"]["pooled"] > 0 and res["teacher_net"]["config"]["hidden"] == 32
    # teacher cost: v, and 2 Heun steps from v (3 NFE) on the 24 of 32 pairs with r < t, for
    # 8 discrete steps; then v alone
    assert tr["teacher_nfe_per_sample"] == pytest.approx((8 * (1 + 3 * 24 / 32) + 16 * 1) / 24)
    assert any("agree_rho" in h for h in tr["history"])


def test_faithful_run_rolls_back_and_supervises_derivatives(small_teacher, monkeypatch):
    from mfcore.targets import DifferentialTarget

    honest = DifferentialTarget._target
    monkeypatch.setattr(DifferentialTarget, "_target", lambda self, *a: honest(self, *a) + 30.0)
    cfg = dict(TINY, target="warmup", guard=True, rollback=True, guard_patience=1, deriv_weight=1.0)
    res = run(cfg, teacher_net=small_teacher)
    tr = res["training"]
    kinds = [k for _, k in tr["events"]]
    assert kinds == ["switch", "revert"]
    assert any(h.get("rolled_back") for h in tr["history"])
    assert any("deriv_loss" in h for h in tr["history"])


def test_faithful_config_errors():
    with pytest.raises(ValueError, match="init='teacher' needs teacher='net'"):
        run(dict(TINY, teacher="exact"))
    with pytest.raises(ValueError, match="switch"):
        run(dict(TINY, switch="sometimes"))
    with pytest.raises(TypeError, match="teacher_net"):
        run(TINY, teacher_net=torch.nn.Linear(2, 2))


def test_the_held_out_mixture_is_three_dimensional_and_fixed():
    a, b = preset("aniso3d"), preset("aniso3d")
    assert a.dim == 3 and a.num_components == 6
    assert torch.equal(a.covs, b.covs) and torch.equal(a.means, b.means)
    evals = torch.linalg.eigvalsh(a.covs)
    torch.testing.assert_close(
        evals, torch.tensor([0.04**2, 0.08**2, 0.2**2], dtype=torch.float64).expand(6, 3)
    )
