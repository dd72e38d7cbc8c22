"""Tests for mfcore.arcflow: closed form against quadrature, composition, limits, head,
sampler on an exactly representable teacher, distillation loss, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import quad
from torch import nn

from mfcore.arcflow import (
    MAX_RATE,
    ArcFlowDistillationLoss,
    ArcFlowHead,
    ArcFlowStudent,
    ArcParams,
    TeacherMixSchedule,
    arc_step,
    arc_velocity,
    arc_velocity_error,
    sample_arcflow,
    split_arc_output,
)

F64 = torch.float64
HYP = settings(max_examples=40, deadline=None)

# Rates that exercise every regime of the closed form: exactly 0, far below and around the
# series threshold, moderate, and the cap.
RATES = st.one_of(
    st.sampled_from([0.0, 1e-300, 1e-12, 1e-6, 9.99e-3, 1e-2, 1.001e-2, 0.5, 20.0, MAX_RATE]),
    st.floats(0.0, MAX_RATE),
)


def _times(b: int, *values: float) -> list[torch.Tensor]:
    return [torch.full((b,), v, dtype=F64) for v in values]


def _random_params(k: int, rates: list[float], s0: float, *, b: int = 2, d: int = 3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(b, k, d, generator=gen, dtype=F64)
    weights = torch.randn(b, k, d, generator=gen, dtype=F64)
    g = torch.tensor(rates, dtype=F64).reshape(1, k, 1).expand(b, k, d).clone()
    return ArcParams(m=m, weights=weights, rates=g, s0=torch.full((b,), s0, dtype=F64))


def _sorted_times(draws: list[float]) -> list[float]:
    return sorted(draws, reverse=True)


# ------------------------------------------------------------------------------------------
# closed form
# ------------------------------------------------------------------------------------------


@HYP
@given(
    rates=st.lists(RATES, min_size=1, max_size=4),
    draws=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
)
def test_step_equals_quadrature_of_velocity(rates, draws):
    s0, s_a, s_b = _sorted_times(draws)
    params = _random_params(len(rates), rates, s0)
    z = torch.randn(2, 3, dtype=F64)
    sa, sb = _times(2, s_a, s_b)
    got = arc_step(params, z, sa, sb).numpy()
    m, w, g = (x.numpy() for x in (params.m, params.weights, params.rates))
    expected = z.numpy().copy()
    scale = np.abs(z.numpy()).copy()
    for b, k, d in np.ndindex(*m.shape):
        integral, _ = quad(
            lambda s, gg=g[b, k, d]: math.exp(gg * (s0 - s)),
            s_b,
            s_a,
            epsabs=0.0,
            epsrel=1e-12,
            limit=200,
        )
        expected[b, d] -= w[b, k, d] * m[b, k, d] * integral
        scale[b, d] += abs(w[b, k, d] * m[b, k, d] * integral)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-11 * (1 + scale.max()))


@HYP
@given(
    rates=st.lists(RATES, min_size=1, max_size=4),
    draws=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4),
)
def test_steps_compose(rates, draws):
    s0, a, b, c = _sorted_times(draws)
    params = _random_params(len(rates), rates, s0, seed=1)
    z = torch.randn(2, 3, dtype=F64)
    ta, tb, tc = _times(2, a, b, c)
    two = arc_step(params, arc_step(params, z, ta, tb), tb, tc)
    one = arc_step(params, z, ta, tc)
    scale = 1 + one.abs().max().item() + z.abs().max().item()
    torch.testing.assert_close(two, one, rtol=0, atol=1e-12 * scale)


@HYP
@given(draws=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3))
def test_single_constant_component_is_an_euler_step(draws):
    s0, s_a, s_b = _sorted_times(draws)
    params = _random_params(1, [0.0], s0, seed=2)
    z = torch.randn(2, 3, dtype=F64)
    sa, sb = _times(2, s_a, s_b)
    euler = z - (s_a - s_b) * params.weights[:, 0] * params.m[:, 0]
    torch.testing.assert_close(arc_step(params, z, sa, sb), euler, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(arc_velocity(params, sb), params.weights[:, 0] * params.m[:, 0])


@HYP
@given(
    rates=st.lists(RATES, min_size=1, max_size=3),
    draws=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
)
def test_step_derivative_in_end_time_is_the_velocity(rates, draws):
    # z_b = z_a - int_{s_b}^{s_a} v, so d z_b / d s_b = v(s_b).
    s0, s_a, s_b = _sorted_times(draws)
    params = _random_params(len(rates), rates, s0, b=1, d=2, seed=3)
    z = torch.randn(1, 2, dtype=F64)
    (sa,) = _times(1, s_a)
    sb = torch.full((1,), s_b, dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda t: arc_step(params, z, sa, t), sb)
    v = arc_velocity(params, sb)
    torch.testing.assert_close(jac[..., 0], v, rtol=1e-10, atol=1e-10 * (1 + v.abs().max()))


def test_rate_limit_to_zero_is_continuous_across_the_series_switch():
    s0, s_a, s_b = _times(1, 1.0, 0.9, 0.0)
    z = torch.zeros(1, 1, dtype=F64)
    gap = 0.9
    threshold = 1e-2 / gap  # g * D crosses the series switch here
    out = []
    for g in (0.0, 1e-300, 1e-9, threshold * (1 - 1e-12), threshold * (1 + 1e-12)):
        p = ArcParams(
            torch.ones(1, 1, 1, dtype=F64),
            torch.ones(1, 1, 1, dtype=F64),
            torch.full((1, 1, 1), g, dtype=F64),
            s0,
        )
        step = -arc_step(p, z, s_a, s_b).item()
        # int_{0.1}^{1} e^{g tau} d tau as its power series (no cancellation at small g)
        terms = [g**n * (1.0 - 0.1 ** (n + 1)) / ((n + 1) * math.factorial(n)) for n in range(30)]
        exact = math.fsum(terms)
        assert step == pytest.approx(exact, rel=1e-14)
        out.append(step)
    assert out[0] == out[1] == pytest.approx(out[2], rel=1e-8)


def test_gradient_in_rates_is_exact_at_zero_and_passes_gradcheck():
    s0, s_a, s_b = _times(4, 1.0, 0.7, 0.2)
    rates = torch.tensor([2e-6, 1e-4, 0.0112, 3.0], dtype=F64).reshape(4, 1, 1)
    m = torch.randn(4, 1, 2, dtype=F64)
    w = torch.ones(4, 1, 1, dtype=F64)
    z = torch.randn(4, 2, dtype=F64)

    def f(g):
        return arc_step(ArcParams(m, w, g, s0), z, s_a, s_b)

    assert torch.autograd.gradcheck(f, (rates.clone().requires_grad_(),))
    g0 = torch.zeros(4, 1, 1, dtype=F64, requires_grad=True)
    f(g0).sum().backward()
    # d/dg int_{s_b}^{s_a} e^{g (s0 - s)} ds at g = 0 is int (s0 - s) ds.
    moment = ((1.0 - 0.2) ** 2 - (1.0 - 0.7) ** 2) / 2
    torch.testing.assert_close(g0.grad[:, 0, 0], -m.sum(dim=(1, 2)) * moment)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cap_rate_stays_finite_in_low_precision(dtype):
    b = 2
    m = torch.ones(b, 2, 3, dtype=dtype)
    w = torch.full((b, 2, 1), 0.5, dtype=F64)
    g = torch.tensor([0.0, MAX_RATE], dtype=F64).reshape(1, 2, 1).expand(b, 2, 1)
    p = ArcParams(m, w, g, torch.ones(b, dtype=F64))
    z = torch.zeros(b, 3, dtype=torch.float32)
    s_a, s_b = _times(b, 1.0, 0.0)
    out = arc_step(p, z, s_a.float(), s_b.float())
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    expected = -(0.5 + 0.5 * math.expm1(MAX_RATE) / MAX_RATE)
    torch.testing.assert_close(out, torch.full_like(out, expected), rtol=1e-5, atol=0)
    v = arc_velocity(p, s_b.float())
    assert v.dtype == dtype


def test_output_dtype_follows_z_and_fp64_stays_fp64():
    p = _random_params(2, [0.0, 1.0], 1.0)
    for dtype in (torch.float32, torch.bfloat16, F64):
        z = torch.randn(2, 3).to(dtype)
        s_a, s_b = _times(2, 1.0, 0.5)
        assert arc_step(p, z, s_a.to(dtype), s_b.to(dtype)).dtype == dtype


def test_velocity_error_matches_definition_and_is_differentiable():
    p = _random_params(3, [0.0, 0.5, 2.0], 0.8)
    m = p.m.clone().requires_grad_()
    p = ArcParams(m, p.weights, p.rates, p.s0)
    (s,) = _times(2, 0.3)
    target = torch.randn(2, 3, dtype=F64)
    err = arc_velocity_error(p, s, target)
    assert err.shape == (2,)
    torch.testing.assert_close(err, (arc_velocity(p, s) - target).square().mean(dim=1))
    err.sum().backward()
    assert m.grad is not None and bool((m.grad != 0).any())


# ------------------------------------------------------------------------------------------
# errors of the math
# ------------------------------------------------------------------------------------------


def _good(b=2, k=2, d=3):
    return dict(
        m=torch.randn(b, k, d, dtype=F64),
        weights=torch.ones(b, k, 1, dtype=F64) / k,
        rates=torch.zeros(b, k, 1, dtype=F64),
        s0=torch.ones(b, dtype=F64),
    )


@pytest.mark.parametrize(
    ("change", "exc", "match"),
    [
        (dict(rates=torch.full((2, 2, 1), -1e-3, dtype=F64)), ValueError, "rates must lie"),
        (dict(rates=torch.full((2, 2, 1), MAX_RATE + 1, dtype=F64)), ValueError, "rates"),
        (dict(rates=torch.full((2, 2, 1), math.nan, dtype=F64)), ValueError, "rates"),
        (dict(m=torch.full((2, 2, 3), math.nan, dtype=F64)), ValueError, "m must be finite"),
        (dict(weights=torch.full((2, 2, 1), math.inf, dtype=F64)), ValueError, "weights"),
        (dict(weights=torch.ones(2, 3, 1, dtype=F64)), ValueError, "weights must have shape"),
        (dict(weights=torch.ones(2, 2, 2, dtype=F64)), ValueError, "weights must have shape"),
        (dict(rates=torch.zeros(2, 2, dtype=F64)), ValueError, "rates must have shape"),
        (dict(rates=torch.zeros(2, 2, 1, dtype=torch.int64)), TypeError, "rates"),
        (dict(m=[1.0]), TypeError, "m must be a torch.Tensor"),
        (dict(s0=torch.ones(3, dtype=F64)), ValueError, "s0"),
        (dict(s0=torch.full((2,), 1.5, dtype=F64)), ValueError, "s0"),
    ],
)
def test_params_reject_bad_fields(change, exc, match):
    with pytest.raises(exc, match=match):
        ArcParams(**{**_good(), **change})


def test_step_and_velocity_reject_bad_input():
    p = ArcParams(**_good())
    z = torch.randn(2, 3, dtype=F64)
    one, half, zero = _times(2, 1.0, 0.5, 0.0)
    with pytest.raises(ValueError, match="s_b must satisfy s_b <= s_a"):
        arc_step(p, z, half, one)
    late = ArcParams(**{**_good(), "s0": half})
    with pytest.raises(ValueError, match="s_a must satisfy s_a <= params.s0"):
        arc_step(late, z, one, zero)
    with pytest.raises(ValueError, match="s must satisfy s <= params.s0"):
        arc_velocity(late, one)
    with pytest.raises(ValueError, match=r"params.m must have shape"):
        arc_step(p, torch.randn(2, 4, dtype=F64), one, zero)
    with pytest.raises(ValueError, match="s_a"):
        arc_step(p, z, torch.ones(3, dtype=F64), zero)
    with pytest.raises(ValueError, match="s_b must lie in"):
        arc_step(p, z, one, torch.full((2,), -0.1, dtype=F64))
    with pytest.raises(TypeError, match="params must be an ArcParams"):
        arc_step(_good(), z, one, zero)
    with pytest.raises(TypeError, match="params must be an ArcParams"):
        arc_velocity(_good(), one)
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        arc_step(p, z.numpy(), one, zero)
    with pytest.raises(ValueError, match="target must have shape"):
        arc_velocity_error(p, half, torch.zeros(2, 4))


# ------------------------------------------------------------------------------------------
# head
# ------------------------------------------------------------------------------------------


def test_split_layout_and_constraints():
    b, k, c, h, w = 2, 3, 4, 5, 6
    raw = torch.randn(b, k * (c + 2), h, w, dtype=F64) * 30
    s0 = torch.rand(b, dtype=F64)
    p = split_arc_output(raw, s0, num_components=k, max_rate=7.0)
    assert p.m.shape == (b, k, c, h, w)
    assert p.weights.shape == p.rates.shape == (b, k, 1, h, w)
    torch.testing.assert_close(p.m[:, 1, 2], raw[:, 1 * c + 2])
    torch.testing.assert_close(p.weights, torch.softmax(raw[:, k * c : k * c + k], 1)[:, :, None])
    torch.testing.assert_close(p.weights.sum(1), torch.ones(b, 1, h, w, dtype=F64))
    assert bool((p.rates[:, 0] == 0).all())
    assert bool((p.rates[:, 1:] > 0).all()) and bool((p.rates < 7.0).all())
    small = torch.full((1, k * (c + 2)), -30.0, dtype=F64)
    rate_small = split_arc_output(small, s0[:1], num_components=k).rates[0, 1:, 0]
    torch.testing.assert_close(rate_small, nn.functional.softplus(small[0, :2]), rtol=1e-6, atol=0)


def test_split_rejects_bad_input():
    s0 = torch.ones(2)
    with pytest.raises(ValueError, match="K\\*\\(C\\+2\\) channels"):
        split_arc_output(torch.randn(2, 7), s0, num_components=2)
    with pytest.raises(ValueError, match="K\\*\\(C\\+2\\) channels"):
        split_arc_output(torch.randn(2, 4), s0, num_components=2)  # C = 0
    with pytest.raises(ValueError, match="num_components"):
        split_arc_output(torch.randn(2, 6), s0, num_components=0)
    with pytest.raises(ValueError, match="max_rate"):
        split_arc_output(torch.randn(2, 6), s0, num_components=2, max_rate=MAX_RATE * 2)
    with pytest.raises(TypeError, match="max_rate"):
        split_arc_output(torch.randn(2, 6), s0, num_components=2, max_rate="1")
    with pytest.raises(ValueError, match="s0"):
        split_arc_output(torch.randn(2, 6), torch.ones(3), num_components=2)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_head_from_velocity_projection_starts_as_an_euler_step(k):
    torch.manual_seed(0)
    proj = nn.Linear(8, 3).double()
    head = ArcFlowHead.from_velocity_projection(proj, k, max_rate=10.0)
    feats = torch.randn(2, 8, 4, 5, dtype=F64)
    s0 = torch.full((2,), 0.9, dtype=F64)
    p = head(feats, s0)
    assert p.m.shape == (2, k, 3, 4, 5) and p.rates.shape == (2, k, 1, 4, 5)
    v_backbone = proj(feats.movedim(1, -1)).movedim(-1, 1)
    for s in (0.9, 0.5, 0.0):
        v = arc_velocity(p, torch.full((2,), s, dtype=F64))
        torch.testing.assert_close(v, v_backbone, rtol=1e-12, atol=1e-12)
    z = torch.randn(2, 3, 4, 5, dtype=F64)
    end = torch.full((2,), 0.2, dtype=F64)
    torch.testing.assert_close(arc_step(p, z, s0, end), z - 0.7 * v_backbone)
    # the components k >= 1 start at distinct positive rates, below the cap
    rates = p.rates[0, :, 0, 0, 0]
    assert rates[0] == 0 and len(set(rates.tolist())) == k and bool((rates < 10.0).all())


def test_head_default_init_is_constant_and_errors():
    head = ArcFlowHead(6, 2, 3, max_rate=1.0).double()
    p = head(torch.randn(5, 6, dtype=F64), torch.ones(5, dtype=F64))
    v1 = arc_velocity(p, torch.ones(5, dtype=F64))
    torch.testing.assert_close(arc_velocity(p, torch.zeros(5, dtype=F64)), v1)
    assert bool((p.rates[:, 1:] > 0).all()) and bool((p.rates < 1.0).all())
    with pytest.raises(ValueError, match="features must have 6 channels"):
        head(torch.randn(5, 7, dtype=F64), torch.ones(5, dtype=F64))
    with pytest.raises(ValueError, match="velocity_weight must have shape"):
        head.reset_constant_velocity(torch.zeros(3, 6))
    with pytest.raises(ValueError, match="velocity_bias must have shape"):
        head.reset_constant_velocity(torch.zeros(2, 6), torch.zeros(3))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        ArcFlowHead.from_velocity_projection(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="channels"):
        ArcFlowHead(6, 0)


# ------------------------------------------------------------------------------------------
# an exactly representable teacher: v(z, s) = g (c - z)
# ------------------------------------------------------------------------------------------
# Its trajectory (run from s0 down) is z(s) = c + (z(s0) - c) e^{g (s0 - s)}, so its velocity
# is g (c - z(s0)) e^{g (s0 - s)}: one momentum component with rate g. The student below puts
# it in component 1 next to an empty constant component 0 (weights 1/2 each).

RATE, CENTRE = 1.3, torch.tensor([0.5, -1.0], dtype=F64)


def exp_teacher(z, s, **cond):
    return RATE * (CENTRE.to(z.dtype) - z)


def exp_solution(z1, s_from, s_to):
    return CENTRE + (z1 - CENTRE) * math.exp(RATE * (s_from - s_to))


class ExactStudent:
    def __init__(self):
        self.seen = []

    def __call__(self, z, s0, **cond):
        self.seen.append((z.clone(), s0.clone(), dict(cond)))
        m = torch.stack([torch.zeros_like(z), 2 * RATE * (CENTRE.to(z.dtype) - z)], dim=1)
        weights = torch.full((z.shape[0], 2, 1), 0.5, dtype=F64)
        rates = torch.tensor([0.0, RATE], dtype=F64).reshape(1, 2, 1).expand(z.shape[0], 2, 1)
        return ArcParams(m, weights, rates, s0)


def test_exact_student_satisfies_the_protocol():
    assert isinstance(ExactStudent(), ArcFlowStudent)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_sampler_with_exact_params_lands_on_the_teacher_solution(steps):
    noise = torch.randn(4, 2, dtype=F64)
    out = sample_arcflow(ExactStudent(), noise, steps)
    torch.testing.assert_close(out, exp_solution(noise, 1.0, 0.0), rtol=1e-12, atol=1e-12)


def test_sampler_trajectory_grid_and_cond():
    noise = torch.randn(3, 2, dtype=F64)
    grid = torch.tensor([0.9, 0.6, 0.55, 0.1], dtype=F64)
    student = ExactStudent()
    end, traj = sample_arcflow(
        student, noise, grid=grid, substeps=2, return_trajectory=True, cond={"y": 1}
    )
    assert torch.equal(traj[-1], end) and torch.equal(traj[0], noise)
    assert traj.shape == (7, 3, 2)
    knots = [0.9, 0.75, 0.6, 0.575, 0.55, 0.325, 0.1]
    for state, s in zip(traj, knots, strict=True):
        torch.testing.assert_close(state, exp_solution(noise, 0.9, s), rtol=1e-12, atol=1e-12)
    assert len(student.seen) == 3 and all(c == {"y": 1} for *_, c in student.seen)
    torch.testing.assert_close(student.seen[1][1], torch.full((3,), 0.6, dtype=F64))
    # substeps do not move the end point
    one = sample_arcflow(ExactStudent(), noise, 3, grid=grid)
    torch.testing.assert_close(one, end, rtol=1e-13, atol=1e-13)


class TinyStudent(nn.Module):
    """An MLP on (z, s0) with an ArcFlow head (channels as the last axis of 2-D data)."""

    def __init__(self, dim=2, hidden=32, k=2):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )
        self.head = ArcFlowHead(hidden, dim, k, max_rate=5.0)

    def forward(self, z, s0, **cond):
        return self.head(self.body(torch.cat([z, s0[:, None].to(z.dtype)], dim=1)), s0)


def test_sampler_grad_mode():
    student = TinyStudent()
    noise = torch.randn(4, 2)
    assert not sample_arcflow(student, noise).requires_grad
    out = sample_arcflow(student, noise, enable_grad=True)
    out.sum().backward()
    assert student.head.proj.weight.grad is not None


def test_sampler_rejects_bad_input():
    noise = torch.randn(3, 2, dtype=F64)
    s = ExactStudent()
    with pytest.raises(ValueError, match="grid must be strictly decreasing"):
        sample_arcflow(s, noise, grid=torch.tensor([0.2, 0.8], dtype=F64))
    with pytest.raises(ValueError, match="grid must be strictly decreasing"):
        sample_arcflow(s, noise, grid=torch.tensor([0.8, 0.8, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="does not match the grid"):
        sample_arcflow(s, noise, 2, grid=torch.tensor([1.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="grid must be finite and lie in"):
        sample_arcflow(s, noise, grid=torch.tensor([1.2, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="grid must have shape"):
        sample_arcflow(s, noise, grid=torch.tensor([1.0], dtype=F64))
    with pytest.raises(ValueError, match="substeps"):
        sample_arcflow(s, noise, substeps=0)
    with pytest.raises(ValueError, match="steps"):
        sample_arcflow(s, noise, steps=0)
    with pytest.raises(TypeError, match="cond must be a mapping"):
        sample_arcflow(s, noise, cond=[1])
    with pytest.raises(TypeError, match="params must be an ArcParams"):
        sample_arcflow(lambda z, s0: z, noise)
    with pytest.raises(ValueError, match="s0 it was given"):
        sample_arcflow(lambda z, s0: s(z, torch.zeros_like(s0)), noise)
    with pytest.raises(ValueError, match="params.m must have shape"):
        sample_arcflow(lambda z, s0: ArcParams(**{**_good(3, 2, 1), "s0": s0}), noise)


# ------------------------------------------------------------------------------------------
# distillation loss
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start", [0.0, 1.0])
@pytest.mark.parametrize("grid", [None, torch.tensor([0.9, 0.4, 0.05], dtype=F64)])
def test_loss_is_zero_for_the_exact_student(start, grid):
    loss_fn = ArcFlowDistillationLoss(
        steps=None if grid is not None else 3,
        grid=grid,
        points_per_step=3,
        mix_schedule=TeacherMixSchedule(start, 10),
    )
    gen = torch.Generator().manual_seed(0)
    loss, metrics = loss_fn(
        ExactStudent(), exp_teacher, torch.randn(8, 2, dtype=F64), generator=gen
    )
    assert loss.ndim == 0 and loss.item() < 1e-25
    assert metrics["teacher_fraction"].item() == start
    assert metrics["mix_probability"].item() == start
    assert all(not v.requires_grad for v in metrics.values())


def test_mixing_carries_the_teacher_euler_state():
    noise = torch.randn(5, 2, dtype=F64)
    student = ExactStudent()
    loss_fn = ArcFlowDistillationLoss(
        steps=2, mix_schedule=TeacherMixSchedule(1.0, 100), teacher_substeps=3
    )
    loss_fn(student, exp_teacher, noise)
    z = noise
    for _ in range(3):
        z = z - (0.5 / 3) * exp_teacher(z, None)
    torch.testing.assert_close(student.seen[1][0], z, rtol=1e-14, atol=1e-14)
    # without mixing, the next state is the student's own closed-form step
    student = ExactStudent()
    ArcFlowDistillationLoss(steps=2, mix_schedule=TeacherMixSchedule(0.0))(
        student, exp_teacher, noise
    )
    torch.testing.assert_close(student.seen[1][0], exp_solution(noise, 1.0, 0.5))


def gaussian_teacher(mu, sd):
    """Exact velocity for x ~ N(mu, sd^2 I): v = (t - (1-t) sd^2) / var_t (z - (1-t) mu) - mu."""

    def v(z, t, **cond):
        t = t[:, None].to(z.dtype)
        var = (1 - t) ** 2 * sd**2 + t**2
        return (t - (1 - t) * sd**2) / var * (z - (1 - t) * mu) - mu

    return v


def test_training_decreases_loss_and_moves_samples_to_the_teacher_endpoint():
    torch.manual_seed(0)
    mu, sd = torch.tensor([1.0, -0.5]), 0.5
    teacher = gaussian_teacher(mu, sd)
    student = TinyStudent()
    loss_fn = ArcFlowDistillationLoss(steps=2, mix_schedule=TeacherMixSchedule(0.5, 100))
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    probe = torch.randn(256, 2)
    exact_end = mu + sd * probe  # the Gaussian ODE maps noise w to mu + sd * w

    def endpoint_error():
        return (sample_arcflow(student, probe) - exact_end).square().sum(1).mean().item()

    before = endpoint_error()
    losses = []
    for _ in range(200):
        loss, metrics = loss_fn(student, teacher, torch.randn(64, 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.2 * np.mean(losses[:10])
    assert endpoint_error() < 0.05 * before
    assert loss_fn.num_calls == 200 and metrics["mix_probability"].item() == 0.0


def test_weighting_scales_per_sample_errors():
    noise = torch.randn(6, 2)
    student = TinyStudent()
    teacher = gaussian_teacher(torch.zeros(2), 1.0)

    def run(weighting):
        fn = ArcFlowDistillationLoss(mix_schedule=TeacherMixSchedule(0.0), weighting=weighting)
        return fn(student, teacher, noise, generator=torch.Generator().manual_seed(3))

    plain, _ = run(None)
    doubled, metrics = run(lambda err, r, t: 2 * torch.ones_like(err))
    torch.testing.assert_close(doubled, 2 * plain)
    assert metrics["weight_mean"].item() == 2.0
    seen = []
    run(lambda err, r, t: seen.append((err.requires_grad, r[0].item(), t[0].item())) or 1 + 0 * err)
    assert seen == [(False, 0.0, 1.0)]  # detached errors, the rollout's grid ends
    with pytest.raises(ValueError, match=r"weighting must return a \(6,\) tensor"):
        run(lambda err, r, t: torch.ones(3))


def test_a_weighting_of_the_former_signature_is_adapted_with_a_warning():
    noise = torch.randn(6, 2)
    student, teacher = TinyStudent(), gaussian_teacher(torch.zeros(2), 1.0)
    with pytest.warns(FutureWarning, match=r"weighting\(per_sample_err\) is deprecated"):
        fn = ArcFlowDistillationLoss(
            mix_schedule=TeacherMixSchedule(0.0), weighting=lambda err: 2 * torch.ones_like(err)
        )
    plain = ArcFlowDistillationLoss(mix_schedule=TeacherMixSchedule(0.0))
    loss, _ = fn(student, teacher, noise, generator=torch.Generator().manual_seed(3))
    ref, _ = plain(student, teacher, noise, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss, 2 * ref)


def test_loss_rejects_bad_input_and_non_finite_teacher():
    noise = torch.randn(4, 2, dtype=F64)
    loss_fn = ArcFlowDistillationLoss()
    with pytest.raises(FloatingPointError, match="teacher velocity"):
        loss_fn(ExactStudent(), lambda z, s: z * math.nan, noise)
    with pytest.raises(TypeError, match="cond must be a mapping"):
        loss_fn(ExactStudent(), exp_teacher, noise, cond=3)
    with pytest.raises(TypeError, match="noise must be a torch.Tensor"):
        loss_fn(ExactStudent(), exp_teacher, noise.tolist())
    with pytest.raises(ValueError, match="step must be >= 0"):
        loss_fn(ExactStudent(), exp_teacher, noise, step=-1)
    with pytest.raises(ValueError, match="points_per_step"):
        ArcFlowDistillationLoss(points_per_step=0)
    with pytest.raises(TypeError, match="mix_schedule"):
        ArcFlowDistillationLoss(mix_schedule=0.5)
    with pytest.raises(TypeError, match="weighting must be callable"):
        ArcFlowDistillationLoss(weighting=1.0)
    with pytest.raises(ValueError, match="grid must be strictly decreasing"):
        ArcFlowDistillationLoss(grid=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="steps"):
        ArcFlowDistillationLoss(steps=0)


# ------------------------------------------------------------------------------------------
# schedule
# ------------------------------------------------------------------------------------------


@HYP
@given(
    start=st.floats(0.0, 1.0),
    decay=st.integers(1, 10_000),
    power=st.floats(0.1, 4.0),
    a=st.integers(0, 20_000),
    b=st.integers(0, 20_000),
)
def test_schedule_decays_monotonically_to_zero(start, decay, power, a, b):
    sched = TeacherMixSchedule(start, decay, power=power)
    assert sched(0) == start and sched(decay) == 0.0 and sched(decay + a) == 0.0
    lo, hi = sorted((a, b))
    assert sched(hi) <= sched(lo) <= start


def test_schedule_and_loss_state_round_trip():
    sched = TeacherMixSchedule(0.8, 50, power=2.0)
    other = TeacherMixSchedule()
    other.load_state_dict(sched.state_dict())
    assert all(other(s) == sched(s) for s in range(0, 60, 7))
    loss_fn = ArcFlowDistillationLoss(mix_schedule=TeacherMixSchedule(0.8, 50, power=2.0))
    noise = torch.randn(3, 2, dtype=F64)
    for _ in range(7):
        loss_fn(ExactStudent(), exp_teacher, noise)
    resumed = ArcFlowDistillationLoss()
    resumed.load_state_dict(loss_fn.state_dict())
    _, m1 = loss_fn(ExactStudent(), exp_teacher, noise)
    _, m2 = resumed(ExactStudent(), exp_teacher, noise)
    assert m1["mix_probability"].item() == m2["mix_probability"].item()
    assert m1["mix_probability"].item() == pytest.approx(sched(7), rel=1e-6)
    assert resumed.num_calls == loss_fn.num_calls == 8
    with pytest.raises(KeyError, match="TeacherMixSchedule state is missing 'decay_steps'"):
        other.load_state_dict({"start": 0.1})
    with pytest.raises(KeyError, match="state is missing .num_calls."):
        resumed.load_state_dict({"mix_schedule": sched.state_dict()})


@pytest.mark.parametrize(
    ("args", "exc"),
    [
        ((1.5, 10), ValueError),
        ((-0.1, 10), ValueError),
        ((0.5, 0), ValueError),
        ((0.5, 1.5), TypeError),
        (("0.5", 10), TypeError),
    ],
)
def test_schedule_rejects_bad_config(args, exc):
    with pytest.raises(exc):
        TeacherMixSchedule(*args)
    with pytest.raises(ValueError, match="power"):
        TeacherMixSchedule(0.5, 10, power=0.0)
