"""The split curriculum (flow matching -> MeanFlow) and the warm-up's gap hand-over, on the
Gaussian flow of test_warmup, whose average velocity is exact."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mfcore import (
    DifferentialTarget,
    HalvingSpan,
    LinearSpan,
    SplitCurriculumTarget,
    TeacherODETarget,
    WarmupTarget,
    split_target,
)
from mfcore.path import FlowPoint

from .test_warmup import F64, exact_u, velocity

_times = st.floats(0.0, 1.0, allow_nan=False)


class Counting:
    """The exact velocity, counting the samples it is evaluated at."""

    def __init__(self) -> None:
        self.points = 0

    def __call__(self, z, t):
        self.points += z.shape[0]
        return velocity(z, t)


def _draw(seed: int, n: int = 64):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=gen, dtype=F64)
    a, b = torch.rand(n, generator=gen, dtype=F64), torch.rand(n, generator=gen, dtype=F64)
    r, t = torch.minimum(a, b), torch.maximum(a, b)
    r[: n // 4] = t[: n // 4]  # a quarter r = t
    return z, r, t


def _compute(target, z, r, t, teacher=velocity, student=exact_u):
    return target.compute(student, FlowPoint(z, r, t, teacher(z, t)), teacher=teacher)


@settings(max_examples=50, deadline=None)
@given(start=st.floats(0.01, 1.0), end=st.floats(0.01, 1.0), steps=st.integers(1, 1000))
def test_linear_span_runs_from_start_to_end_and_holds(start, end, steps):
    span = LinearSpan(start, end, steps)
    assert span(0) == start and span(steps) == pytest.approx(end, rel=1e-12)
    assert span(10 * steps) == span(steps)
    mid = span(steps // 2)
    assert min(start, end) - 1e-12 <= mid <= max(start, end) + 1e-12


@settings(max_examples=50, deadline=None)
@given(stages=st.integers(1, 8), steps=st.integers(8, 1000), step=st.integers(0, 2000))
def test_halving_span_halves_once_per_stage(stages, steps, step):
    span = HalvingSpan(1.0, stages, steps)
    assert span(0) == 1.0
    assert span(10 * steps) == 2.0 ** -(stages - 1)
    assert span(step) in {2.0**-k for k in range(stages)}
    assert span(step + 1) <= span(step)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_the_whole_interval_to_the_teacher_is_flow_matching(seed):
    """a = 1 (relative) or an absolute step >= every gap: the target is v at every pair."""
    z, r, t = _draw(seed)
    for target in (
        SplitCurriculumTarget(LinearSpan(1.0, 1.0, 10)),
        SplitCurriculumTarget(HalvingSpan(1.0, 1, 10), relative=False),
    ):
        # fp64: (t - s) / (t - r) is 1 up to the split point's rounding, over a gap t - r
        torch.testing.assert_close(_compute(target, z, r, t), velocity(z, t), rtol=1e-9, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), a=st.floats(0.05, 1.0))
def test_relative_span_is_the_split_target_at_that_point(seed, a):
    """Two code paths: the curriculum at share a equals split_target at s = t - a (t - r)."""
    z, r, t = _draw(seed)
    target = SplitCurriculumTarget(LinearSpan(a, a, 1))
    s = (t - a * (t - r)).clamp(min=r, max=t)
    ref = split_target(exact_u, velocity, z, r, t, s, velocity(z, t))
    torch.testing.assert_close(_compute(target, z, r, t), ref, rtol=1e-12, atol=1e-12)


def test_a_shrinking_span_approaches_the_differential_target():
    """The secant's limit is MeanFlow's identity: for the exact field the error of the split
    target falls like a (one Euler step of length a (t - r))."""
    z, r, t = _draw(0, n=256)
    exact = exact_u(z, r, t)
    diff = DifferentialTarget().compute(exact_u, FlowPoint(z, r, t, velocity(z, t)))
    torch.testing.assert_close(diff, exact, rtol=1e-9, atol=1e-9)  # the fixed point
    errors = []
    for a in (1e-1, 1e-2, 1e-3):
        u = _compute(SplitCurriculumTarget(LinearSpan(a, a, 1)), z, r, t)
        errors.append((u - exact).abs().max().item())
    assert errors[0] > 5 * errors[1] > 25 * errors[2]
    assert errors[2] < 1e-2


def test_one_euler_step_costs_no_teacher_evaluation_beyond_v():
    z, r, t = _draw(1)
    teacher = Counting()
    out = SplitCurriculumTarget(LinearSpan(0.5, 0.5, 1))(
        exact_u, FlowPoint(z, r, t, velocity(z, t)), teacher=teacher, step=0
    )
    assert teacher.points == 0
    assert out.metrics["teacher_evals_per_sample"].item() == 1.0


def test_the_warm_up_passes_its_step_to_a_curriculum():
    curriculum = SplitCurriculumTarget(LinearSpan(1.0, 0.5, 10))
    warm = WarmupTarget(curriculum, switch_step=100, every=None)
    z, r, t = _draw(2)
    for step in (0, 7):
        warm(exact_u, FlowPoint(z, r, t, velocity(z, t)), teacher=velocity, step=step)
        assert curriculum.step == step
    state = curriculum.state_dict()
    fresh = SplitCurriculumTarget(LinearSpan(1.0, 0.5, 10))
    fresh.load_state_dict(state)
    assert fresh.step == 7 and fresh.span_at(fresh.step) == pytest.approx(0.65)


def test_bad_curricula_are_refused_by_name():
    with pytest.raises(TypeError, match="span"):
        SplitCurriculumTarget(0.5)
    with pytest.raises(ValueError, match="end"):
        LinearSpan(1.0, 0.0, 10)
    with pytest.raises(ValueError, match="stages"):
        HalvingSpan(1.0, 0, 10)
    z, r, t = _draw(3)
    with pytest.raises(ValueError, match="relative span"):
        _compute(SplitCurriculumTarget(lambda step: 2.0), z, r, t)
    with pytest.raises(ValueError, match="span"):
        _compute(SplitCurriculumTarget(lambda step: float("nan")), z, r, t)
    with pytest.raises(ValueError, match="teacher"):
        SplitCurriculumTarget(LinearSpan()).compute(exact_u, FlowPoint(z, r, t, velocity(z, t)))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), blend=st.integers(2, 20), into=st.integers(0, 19))
def test_the_gap_hand_over_takes_short_intervals_first(seed, blend, into):
    """Rows with t - r <= alpha get the differential target, the others the discrete one,
    which integrates them alone."""
    into = min(into, blend - 1)
    discrete = TeacherODETarget(steps=4)
    warm = WarmupTarget(discrete, switch_step=0, blend_steps=blend, handover="gap", every=None)
    z, r, t = _draw(seed)
    z = z.requires_grad_(False)

    def student(z, r, t):  # not the exact field: the two targets differ
        return exact_u(z, r, t) + 0.1 * (t - r)[:, None] * z

    teacher = Counting()
    point = FlowPoint(z, r, t, velocity(z, t))
    warm(student, point, teacher=teacher, step=0)  # the switch
    teacher.points = 0
    out = warm(student, point, teacher=teacher, step=into)
    alpha = warm.blend_weight()
    short = (t - r) <= alpha
    diff = DifferentialTarget().compute(student, point)
    disc = discrete.compute(student, point, teacher=velocity)
    want = torch.where(short[:, None], diff, disc)
    torch.testing.assert_close(out.target, want, rtol=1e-10, atol=1e-10)
    long = int((~short).sum())
    assert teacher.points == long * (4 * 2 - 1)  # Heun-4 from v: 7 more per long row


def test_an_unknown_hand_over_is_refused():
    with pytest.raises(ValueError, match="handover"):
        WarmupTarget(TeacherODETarget(), switch_step=0, handover="fade")
