"""MeanFlow targets on exact fields: the exact average velocity is the differential
target's fixed point, the discrete targets converge to it, and the warm-up switch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import solve_ivp

from mfcore.jvp import total_derivative
from mfcore.losses import MeanFlowLoss
from mfcore.path import FlowPoint
from mfcore.solvers import odeint
from mfcore.targets import (
    DifferentialTarget,
    SplitTarget,
    TeacherODETarget,
    differential_target,
    split_target,
    teacher_ode_target,
)
from mfcore.toys.gmm import GaussianMixture
from mfcore.warmup import WarmupTarget
from tests._nets import MLPStudent

F64 = torch.float64
EXACT_STEPS = 96


def _gmm() -> GaussianMixture:
    # Broad components keep the flow smooth, so fixed-step orders show cleanly.
    means = torch.tensor([[1.0, 0.5], [-1.0, 0.0], [0.2, -1.2]], dtype=F64)
    return GaussianMixture.isotropic(means, std=torch.tensor([0.5, 0.6, 0.7]), weights=None)


def _exact_u(gmm):
    """The exact average velocity, by a fine float64 RK4 solve of the exact flow."""

    def u(z, r, t):
        z_r = odeint(gmm.velocity, z, t, r, EXACT_STEPS, method="rk4")
        return (z - z_r) / (t - r)[:, None]

    return u


def _draw(seed, batch=4, min_gap=0.05):
    gen = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(batch, 2, generator=gen, dtype=F64)
    t = min_gap + 0.1 + (0.9 - min_gap) * torch.rand(batch, generator=gen, dtype=F64)
    r = (t - min_gap) * torch.rand(batch, generator=gen, dtype=F64)
    return z, r, t


def test_exact_average_velocity_matches_scipy():
    gmm, (z, r, t) = _gmm(), _draw(0)
    u = _exact_u(gmm)(z, r, t)
    for b in range(z.shape[0]):

        def f(s, y):
            zz = torch.as_tensor(y, dtype=F64)[None]
            return gmm.velocity(zz, torch.tensor([s], dtype=F64))[0].numpy()

        sol = solve_ivp(
            f, (t[b].item(), r[b].item()), z[b].numpy(), rtol=1e-12, atol=1e-12, method="DOP853"
        )
        u_ref = (z[b].numpy() - sol.y[:, -1]) / (t[b] - r[b]).item()
        np.testing.assert_allclose(u[b].numpy(), u_ref, rtol=1e-8, atol=1e-9)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_exact_average_velocity_is_fixed_point_of_differential_target(seed):
    gmm, (z, r, t) = _gmm(), _draw(seed)
    u_fn = _exact_u(gmm)
    v = gmm.velocity(z, t)
    # "autograd" is exact like "func" (their agreement is tested in test_jvp) and several
    # times faster through a 96-step solve of the mixture's velocity.
    u, dudt = total_derivative(u_fn, z, r, t, v, method="autograd")
    target = differential_target(u, dudt, v, r, t)
    torch.testing.assert_close(target, u, rtol=1e-7, atol=1e-8)
    # and a wrong field is not a fixed point: the identity has teeth
    u2, d2 = total_derivative(lambda z, r, t: 1.1 * u_fn(z, r, t), z, r, t, v, method="fd")
    assert (differential_target(u2, d2, v, r, t) - u2).abs().max() > 1e-3


@pytest.mark.parametrize("method, order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_teacher_ode_target_converges_at_solver_order(method, order):
    gmm, (z, r, t) = _gmm(), _draw(1, batch=6, min_gap=0.3)
    exact = _exact_u(gmm)(z, r, t)
    steps = [2, 4, 8, 16] if order < 4 else [1, 2, 4, 8]
    errs = [
        (teacher_ode_target(gmm, z, r, t, steps=n, method=method) - exact).norm().item()
        for n in steps
    ]
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.3, (method, slope, errs)


def test_teacher_ode_target_is_velocity_where_r_equals_t():
    gmm, (z, r, t) = _gmm(), _draw(2)
    r = r.clone()
    r[:2] = t[:2]
    u = teacher_ode_target(gmm, z, r, t, steps=4)
    torch.testing.assert_close(u[:2], gmm.velocity(z[:2], t[:2]))
    assert torch.isfinite(u).all()


def test_split_target_with_exact_fields():
    gmm, (z, r, t) = _gmm(), _draw(3)
    u_fn = _exact_u(gmm)
    exact = u_fn(z, r, t)
    v = gmm.velocity(z, t)
    s = r + 0.4 * (t - r)
    self_consistent = split_target(u_fn, None, z, r, t, s, v, teacher_pieces="none")
    torch.testing.assert_close(self_consistent, exact, rtol=1e-8, atol=1e-9)
    both = split_target(
        u_fn, gmm, z, r, t, s, v, teacher_pieces="both", teacher_steps=64, method="rk4"
    )
    torch.testing.assert_close(both, exact, rtol=1e-7, atol=1e-8)
    first = split_target(
        u_fn, gmm, z, r, t, s, v, teacher_pieces="first", teacher_steps=64, method="rk4"
    )
    torch.testing.assert_close(first, exact, rtol=1e-7, atol=1e-8)
    # a student that is off by a constant factor makes the self-consistent target move
    off = split_target(lambda *a: 0.5 * u_fn(*a), None, z, r, t, s, v, teacher_pieces="none")
    assert (off - exact).abs().max() > 1e-2


def test_target_objects_shapes_and_detach():
    torch.manual_seed(0)
    gmm, (z, r, t) = _gmm(), _draw(4)
    student = MLPStudent(2).to(F64)
    v = gmm.velocity(z, t)
    for target in (
        DifferentialTarget(),
        DifferentialTarget("autograd", single_forward=False),
        TeacherODETarget(steps=2),
        SplitTarget(),
        SplitTarget("none"),
    ):
        out = target(student, FlowPoint(z, r, t, v), teacher=gmm)
        assert out.pred.shape == z.shape and out.pred.requires_grad
        assert out.target.shape == z.shape and not out.target.requires_grad
    with pytest.raises(ValueError, match="teacher"):
        TeacherODETarget()(student, FlowPoint(z, r, t, v))


def test_differential_target_options():
    z, r, t = _draw(5)
    u = torch.zeros_like(z)
    v, dudt = torch.ones_like(z), torch.full_like(z, 100.0)
    expected = v - (t - r)[:, None] * dudt
    torch.testing.assert_close(differential_target(u, dudt, v, r, t), expected)
    student = lambda z, r, t: 50.0 * t[:, None] * z  # noqa: E731  du/dt = 50 z + 50 t v
    clamped = DifferentialTarget(clamp=2.0)(student, FlowPoint(z, r, t, v))
    assert clamped.target.abs().max() <= 2.0
    normed = DifferentialTarget(tangent_norm=1e-3)(student, FlowPoint(z, r, t, v))
    tangent = v - normed.target
    rms = tangent.pow(2).mean(1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-2, atol=1e-2)


def _setup():
    torch.manual_seed(0)
    gmm, (z, r, t) = _gmm(), _draw(6, batch=8)
    return gmm, MLPStudent(2).to(F64), z, r, t, gmm.velocity(z, t)


def test_warmup_switches_at_step_and_resumes():
    gmm, student, z, r, t, v = _setup()
    w = WarmupTarget(TeacherODETarget(steps=2), switch_step=3, blend_steps=2)
    phases = []
    for step in range(1, 8):
        out = w(student, FlowPoint(z, r, t, v), teacher=gmm, step=step)
        phases.append((w.phase, round(float(out.metrics["warmup_alpha"]), 3)))
    assert [p for p, _ in phases] == ["discrete"] * 2 + ["blend"] * 2 + ["differential"] * 3
    assert [a for _, a in phases] == [0.0, 0.0, 0.333, 0.667, 1.0, 1.0, 1.0]
    resumed = WarmupTarget(TeacherODETarget(steps=2), switch_step=3, blend_steps=2)
    resumed.load_state_dict(w.state_dict())
    assert resumed.phase == w.phase == "differential" and resumed.step == 7


def test_blend_mixes_the_two_targets():
    gmm, student, z, r, t, v = _setup()
    w = WarmupTarget(TeacherODETarget(steps=2), switch_step=1, blend_steps=1)
    out = w(student, FlowPoint(z, r, t, v), teacher=gmm, step=1)  # alpha = 1/2
    disc = teacher_ode_target(gmm, z, r, t, steps=2, method="heun", v=v)
    diff = DifferentialTarget()(student, FlowPoint(z, r, t, v)).target
    torch.testing.assert_close(out.target, 0.5 * disc + 0.5 * diff)


def test_warmup_automatic_criterion():
    gmm, _, z, r, t, v = _setup()
    exact = _exact_u(gmm)
    w = WarmupTarget(TeacherODETarget(steps=32, method="rk4"), threshold=1e-3, ema=0.0, every=1)
    point = FlowPoint(z, r, t, v)
    w(lambda z, r, t: torch.zeros_like(z), point, teacher=gmm)
    assert w.phase == "discrete" and w.fit_error == pytest.approx(1.0)
    w(exact, point, teacher=gmm)  # fits: switches from the next step on
    assert w.fit_error < 1e-3 and w.phase == "discrete"
    w(exact, point, teacher=gmm)
    assert w.phase == "differential" and w.switched_at == w.step == 3


def test_warmup_bad_arguments():
    with pytest.raises(ValueError, match="never switches"):
        WarmupTarget(TeacherODETarget())
    with pytest.raises(TypeError, match="discrete"):
        WarmupTarget(DifferentialTarget(), switch_step=3)
    with pytest.raises(ValueError, match="ema"):
        WarmupTarget(TeacherODETarget(), switch_step=3, ema=1.0)
    with pytest.raises(KeyError, match="phase|step"):
        WarmupTarget(TeacherODETarget(), switch_step=3).load_state_dict({})


def test_bad_input():
    gmm, (z, r, t) = _gmm(), _draw(7)
    v = gmm.velocity(z, t)
    with pytest.raises(ValueError, match="r <= t"):
        teacher_ode_target(gmm, z, t, r)
    with pytest.raises(ValueError, match="steps"):
        teacher_ode_target(gmm, z, r, t, steps=0)
    with pytest.raises(ValueError, match="v"):
        differential_target(z, z, v[:2], r, t)
    with pytest.raises(ValueError, match="r <= s|s <= t"):
        split_target(gmm, gmm, z, r, t, r - 0.01 * (r > 0), v) if bool((r > 0.01).all()) else (
            split_target(gmm, gmm, z, r + 0.01, t + 0.01 * (t < 0.99), r, v)
        )
    with pytest.raises(ValueError, match="teacher_pieces"):
        SplitTarget("all")
    with pytest.raises(ValueError, match="needs a teacher"):
        split_target(gmm, None, z, r, t, r, v, teacher_pieces="first")
    with pytest.raises(ValueError, match="jvp_method"):
        DifferentialTarget("numeric")
    assert math.isfinite(float(teacher_ode_target(gmm, z, r, t).sum()))


def test_targets_are_typed_by_their_protocols_and_the_loss_refuses_anything_else():
    from mfcore.fields import DiscreteTarget, Target

    ode, split, diff = TeacherODETarget(), SplitTarget(), DifferentialTarget()
    warm = WarmupTarget(TeacherODETarget(), switch_step=3)
    assert all(isinstance(x, Target) for x in (ode, split, diff, warm))
    assert isinstance(ode, DiscreteTarget) and isinstance(split, DiscreteTarget)
    assert (ode.phase, split.phase, diff.phase, warm.phase) == (
        "discrete",
        "discrete",
        "differential",
        "discrete",
    )
    with pytest.raises(TypeError, match="target must be a mfcore.fields.Target"):
        MeanFlowLoss(target=lambda student, z, r, t, v, **kw: None)
