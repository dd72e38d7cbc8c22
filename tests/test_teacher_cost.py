"""Issue 19, item 2, "No wasted teacher calls": the discrete targets integrate the teacher
only at the pairs with ``r < t`` and start each solve from the ``v`` they were given.

Each test compares the gathered solve with the full-batch computation it replaced (every
sample integrated with :func:`mfcore.solvers.odeint`, ``v`` put back where ``r = t``), in
float64, or counts the rows the teacher is called on.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mfcore.fields import TargetOutput
from mfcore.losses import AdaptiveWeight, MeanFlowLoss
from mfcore.path import FlowPoint
from mfcore.solvers import SOLVERS, odeint
from mfcore.targets import SplitTarget, TeacherODETarget, split_target, teacher_ode_target
from mfcore.warmup import WarmupTarget
from tests._nets import MLPStudent
from tests._syncs import count_host_reads

F64 = torch.float64
#: float64 solves of the same field on a gathered and on a full batch: equal to rounding.
FP64_TOL = dict(rtol=1e-12, atol=1e-12)


def teacher(z, t, y=None, scale=None):
    """A nonlinear field with a per-sample condition ``y`` ``(B, 2)`` and a shared one
    ``scale`` ``(1, 2)`` (broadcast over the batch)."""
    v = torch.tanh(z) * (1.0 + t[:, None]) - 0.5 * torch.sin(z.flip(1))
    if y is not None:
        v = v + y * t[:, None]
    return v if scale is None else v * scale


class Counting:
    """``teacher`` that records the rows of every call."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def __call__(self, z, t, **cond):
        self.rows.append(z.shape[0])
        return teacher(z, t, **cond)


def full_batch_secant(z, r, t, steps, method, v, cond):
    """The computation before: every sample integrated from t to r, ``v`` where ``r = t``."""
    z_r = odeint(teacher, z, t, r, steps, method=method, cond=cond)
    gap = t - r
    u = (z - z_r) / torch.where(gap == 0, 1.0, gap)[:, None]
    return torch.where((gap == 0)[:, None], v, u)


@st.composite
def batches(draw):
    """``(z, r, t, cond)`` in float64, with any mix of ``r = t`` and ``r < t`` pairs (all of
    one kind included)."""
    equal = draw(st.lists(st.booleans(), min_size=1, max_size=9))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    n = len(equal)
    t = 0.05 + 0.95 * torch.rand(n, generator=gen, dtype=F64)
    r = torch.where(torch.tensor(equal), t, t * torch.rand(n, generator=gen, dtype=F64))
    z = torch.randn(n, 2, generator=gen, dtype=F64)
    cond = {"y": torch.randn(n, 2, generator=gen, dtype=F64)}
    return z, r, t, {**cond, "scale": torch.tensor([[1.0, 0.5]], dtype=F64)}


@settings(max_examples=40, deadline=None)
@given(batch=batches(), method=st.sampled_from(sorted(SOLVERS)), steps=st.integers(1, 3))
def test_no_wasted_teacher_calls_the_target_equals_the_full_batch_solve(batch, method, steps):
    z, r, t, cond = batch
    v = teacher(z, t, **cond)
    old = full_batch_secant(z, r, t, steps, method, v, cond)
    new = teacher_ode_target(teacher, z, r, t, steps=steps, method=method, v=v, cond=cond)
    torch.testing.assert_close(new, old, **FP64_TOL)
    omitted = teacher_ode_target(teacher, z, r, t, steps=steps, method=method, cond=cond)
    torch.testing.assert_close(omitted, old, **FP64_TOL)
    for target in (
        TeacherODETarget(steps, method),
        TeacherODETarget(steps, method, always_call=True),
    ):
        obj = target.compute(None, FlowPoint(z, r, t, v, cond), teacher=teacher)
        torch.testing.assert_close(obj, old, **FP64_TOL)


@settings(max_examples=25, deadline=None)
@given(batch=batches(), lam=st.lists(st.sampled_from([0.0, 1.0, 0.3, 0.8]), min_size=9))
def test_no_wasted_teacher_calls_the_split_target_equals_the_full_batch_solve(batch, lam):
    z, r, t, cond = batch
    s = torch.minimum(r + torch.tensor(lam[: len(t)], dtype=F64) * (t - r), t)
    v = teacher(z, t, **cond)
    net = MLPStudent(2).to(F64)

    def student(z, r, t, **_):
        return net(z, r, t)

    with torch.no_grad():
        u1 = full_batch_secant(z, s, t, 2, "heun", v, cond)
        z_s = z - (t - s)[:, None] * u1
        second = {
            "first": student(z_s, r, s),
            "both": full_batch_secant(z_s, r, s, 2, "heun", teacher(z_s, s, **cond), cond),
        }
    gap = (t - r)[:, None]
    kw = {"teacher_steps": 2, "method": "heun", "cond": cond}
    for pieces, u2 in second.items():
        old = ((t - s)[:, None] * u1 + (s - r)[:, None] * u2) / torch.where(gap == 0, 1.0, gap)
        old = torch.where(gap == 0, v, old)
        new = split_target(student, teacher, z, r, t, s, v, teacher_pieces=pieces, **kw)
        torch.testing.assert_close(new, old, **FP64_TOL)


@pytest.mark.parametrize("always_call", [False, True])
@pytest.mark.parametrize("method", sorted(SOLVERS))
@pytest.mark.parametrize("equal", [[1, 1, 1, 1], [1, 0, 1, 1, 1, 0, 1, 1], [0, 0, 0]])
def test_no_wasted_teacher_calls_counts_the_teacher_rows(method, equal, always_call):
    """Only the ``K`` pairs with ``r < t`` are integrated, the first stage from ``v``:
    ``K (steps * stages - 1)`` rows, none when every ``r = t``; with ``always_call`` one row
    runs then (an empty span), so every batch calls the teacher alike (a sharded teacher's
    ranks gather together)."""
    steps, stages = 4, SOLVERS[method].stages
    gen = torch.Generator().manual_seed(0)
    b = len(equal)
    t = 0.1 + 0.9 * torch.rand(b, generator=gen, dtype=F64)
    r = torch.where(torch.tensor(equal, dtype=torch.bool), t, 0.5 * t)
    z = torch.randn(b, 2, generator=gen, dtype=F64)
    v = teacher(z, t)
    k = b - sum(equal)
    k = max(k, 1) if always_call else k
    counting = Counting()
    target = TeacherODETarget(steps, method, always_call=always_call)
    out = target(MLPStudent(2).to(F64), FlowPoint(z, r, t, v), teacher=counting)
    assert counting.rows == ([k] * (steps * stages - 1) if k else [])
    expected = 1.0 + k * (steps * stages - 1) / b
    assert out.metrics["teacher_evals_per_sample"].item() == pytest.approx(expected)
    if all(equal):
        assert torch.equal(out.target, v)


@pytest.mark.parametrize("always_call", [False, True])
def test_no_wasted_teacher_calls_split_both_on_r_equal_t_pairs_only(always_call):
    """``SplitTarget("both")`` integrates both pieces at the same rows (one count): none when
    every ``r = t`` (one with ``always_call``), and the target is then ``v``."""
    gen = torch.Generator().manual_seed(6)
    t = 0.1 + 0.9 * torch.rand(4, generator=gen, dtype=F64)
    z = torch.randn(4, 2, generator=gen, dtype=F64)
    v, counting = teacher(z, t), Counting()
    target = SplitTarget("both", 2, "heun", always_call=always_call)
    point = FlowPoint(z, t, t, v)
    out = target(MLPStudent(2).to(F64), point, teacher=counting, generator=gen)
    k = 1 if always_call else 0
    assert counting.rows == ([k] * (3 + 4) if k else [])  # [s, t], then v at s and [r, s]
    assert torch.equal(out.target, v)
    assert out.metrics["teacher_evals_per_sample"].item() == pytest.approx(1 + 7 * k / 4)


def test_no_wasted_teacher_calls_heun4_at_a_quarter_of_the_pairs_costs_2_75_not_9():
    """mfcore-distill's default (Heun, 4 steps, 75 % of the pairs r = t): 2.75 teacher
    evaluations per sample; ``reuse_v=False`` skips the r = t rows only (3); the full batch,
    as before, cost 9."""
    gen = torch.Generator().manual_seed(1)
    t = 0.1 + 0.9 * torch.rand(8, generator=gen, dtype=F64)
    r = torch.where(torch.arange(8) < 2, 0.5 * t, t)
    z = torch.randn(8, 2, generator=gen, dtype=F64)
    student = MLPStudent(2).to(F64)
    for reuse, cost in ((True, 2.75), (False, 3.0)):
        target = TeacherODETarget(4, "heun", reuse_v=reuse)
        out = target(student, FlowPoint(z, r, t, teacher(z, t)), teacher=teacher)
        assert out.metrics["teacher_evals_per_sample"].item() == cost


def test_no_wasted_teacher_calls_reuse_v_false_integrates_the_teacher_alone():
    """With a ``v`` that is not the teacher's (a guided one), ``reuse_v=False`` keeps the
    computation before: the teacher's own solve, ``v`` only where ``r = t``."""
    gen = torch.Generator().manual_seed(2)
    t = 0.1 + 0.9 * torch.rand(6, generator=gen, dtype=F64)
    r = torch.where(torch.arange(6) % 2 == 0, 0.3 * t, t)
    z = torch.randn(6, 2, generator=gen, dtype=F64)
    guided = teacher(z, t) + 0.7
    old = full_batch_secant(z, r, t, 3, "heun", guided, {})
    kw = {"teacher": teacher}
    new = TeacherODETarget(3, "heun", reuse_v=False).compute(None, FlowPoint(z, r, t, guided), **kw)
    torch.testing.assert_close(new, old, **FP64_TOL)
    reused = TeacherODETarget(3, "heun").compute(None, FlowPoint(z, r, t, guided), **kw)
    assert not torch.allclose(reused[::2], old[::2])  # its first stage is this v


class FullBatchTarget:
    """The computation before, as a :class:`~mfcore.fields.Target` for the loss."""

    phase = "discrete"

    def __call__(self, student, point, *, teacher=None, **_):
        z_t, r, t = point.z, point.r, point.t
        target = full_batch_secant(z_t, r, t, 4, "heun", point.v, point.cond)
        return TargetOutput(student(z_t, r, t), target.detach(), {})

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        del state


def _grads(target):
    torch.manual_seed(0)
    student = MLPStudent(2).to(F64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 2, generator=gen, dtype=F64)
    loss_fn = MeanFlowLoss(target=target, weighting=AdaptiveWeight(p=0))
    loss, _ = loss_fn(student, x, teacher=teacher, generator=gen)
    loss.backward()
    return loss.detach(), [p.grad for p in student.parameters()]


def test_no_wasted_teacher_calls_leaves_the_loss_and_its_gradients_as_they_were():
    old_loss, old_grads = _grads(FullBatchTarget())
    new_loss, new_grads = _grads(TeacherODETarget(4, "heun"))
    torch.testing.assert_close(new_loss, old_loss, **FP64_TOL)
    for new, old in zip(new_grads, old_grads, strict=True):
        torch.testing.assert_close(new, old, **FP64_TOL)


def test_no_wasted_teacher_calls_reaches_the_warmup_and_its_blend():
    """The warm-up's discrete phase reports the cost; its blend computes the same target."""
    gen = torch.Generator().manual_seed(4)
    t = 0.1 + 0.9 * torch.rand(8, generator=gen, dtype=F64)
    r = torch.where(torch.arange(8) < 3, 0.4 * t, t)
    z = torch.randn(8, 2, generator=gen, dtype=F64)
    v = teacher(z, t)
    student = MLPStudent(2).to(F64)
    warm = WarmupTarget(TeacherODETarget(4, "heun"), switch_step=10, every=None)
    out = warm(student, FlowPoint(z, r, t, v), teacher=teacher, step=1)
    assert out.metrics["teacher_evals_per_sample"].item() == pytest.approx(1 + 3 * 7 / 8)
    torch.testing.assert_close(out.target, full_batch_secant(z, r, t, 4, "heun", v, {}))


def test_no_wasted_teacher_calls_reads_the_host_once_for_the_row_count():
    """The row count is the one read the discrete target adds (``nonzero``); the solve
    itself reads nothing."""
    gen = torch.Generator().manual_seed(5)
    t = torch.rand(8, generator=gen)
    r, z = 0.5 * t, torch.randn(8, 2, generator=gen)
    v = teacher(z, t)
    for target in (TeacherODETarget(4), SplitTarget("both", 2)):
        with count_host_reads() as reads:
            target.compute(MLPStudent(2), FlowPoint(z, r, t, v), teacher=teacher, generator=gen)
        assert reads == ["aten.nonzero"]


def test_no_wasted_teacher_calls_guided_training_must_not_start_a_solve_from_the_guided_v():
    from mfcore.guidance import MeanFlowGuidance

    guidance = MeanFlowGuidance(omega=2.0, uncond={"y": torch.zeros(1)})
    for target in (
        TeacherODETarget(steps=2),
        SplitTarget("first"),
        WarmupTarget(TeacherODETarget(steps=2), switch_step=5),
    ):
        with pytest.raises(ValueError, match="reuse_v=False"):
            MeanFlowLoss(target=target, guidance=guidance)
    MeanFlowLoss(target=TeacherODETarget(steps=2, reuse_v=False), guidance=guidance)
    warm = WarmupTarget(TeacherODETarget(steps=2, reuse_v=False), switch_step=5)
    MeanFlowLoss(target=warm, guidance=guidance)
