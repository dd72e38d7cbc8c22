"""MeanFlowLoss, FlowMatchingLoss and weighting: reductions, equivalences, training signal."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mfcore.losses import (
    AdaptiveWeight,
    FlowMatchingLoss,
    MeanFlowLoss,
    per_sample_sq_error,
    sample_path,
)
from mfcore.path import FlowPoint
from mfcore.solvers import sample_meanflow
from mfcore.targets import DifferentialTarget, TeacherODETarget
from mfcore.time import TimePairSampler, UniformTime
from mfcore.toys.gmm import GaussianMixture
from mfcore.warmup import WarmupTarget
from tests._cfg_peers import TinyStudent, peer_data, peer_inputs, peer_student, reference_loss
from tests._nets import MLPStudent

F64 = torch.float64


def _fixed_pairs(r, t):
    def sampler(batch_size, *, device=None, dtype=torch.float32, generator=None):
        return r.to(dtype), t.to(dtype)

    return sampler


@settings(max_examples=20, deadline=None)
@given(
    sq=st.lists(st.floats(0, 1e3), min_size=1, max_size=8),
    p=st.floats(0, 2),
    c=st.floats(1e-4, 1.0),
)
def test_adaptive_weight(sq, p, c):
    sq = torch.tensor(sq, dtype=F64, requires_grad=True)
    w = AdaptiveWeight(p, c)(sq, None, None)
    torch.testing.assert_close(w, (sq.detach() + c) ** (-p))
    assert not w.requires_grad


def test_reduces_to_flow_matching_when_r_equals_t():
    torch.manual_seed(0)
    student = MLPStudent(2).to(F64)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, generator=gen, dtype=F64)
    noise = torch.randn(16, 2, generator=gen, dtype=F64)
    t = torch.rand(16, generator=gen, dtype=F64)
    mf = MeanFlowLoss(_fixed_pairs(t, t), DifferentialTarget(), AdaptiveWeight(p=0.0))
    loss_mf, _ = mf(student, x, noise=noise)
    (g_mf,) = torch.autograd.grad(loss_mf, [student.net[0].weight])

    def velocity(z, t):
        return student(z, t, t)

    loss_fm, _ = FlowMatchingLoss()(velocity, x, noise=noise, t=t)
    (g_fm,) = torch.autograd.grad(loss_fm, [student.net[0].weight])
    torch.testing.assert_close(loss_mf, loss_fm)
    torch.testing.assert_close(g_mf, g_fm)


def test_path_and_error_helpers():
    x, noise = torch.ones(3, 2, dtype=F64), torch.zeros(3, 2, dtype=F64)
    t = torch.tensor([0.0, 0.25, 1.0], dtype=F64)
    torch.testing.assert_close(sample_path(x, noise, t), (1 - t)[:, None].expand(3, 2))
    torch.testing.assert_close(per_sample_sq_error(x, noise), torch.full((3,), 2.0, dtype=F64))


def _train(teacher, data, target, weighting=None, steps=500, seed=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    student = MLPStudent(2, hidden=64)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    mf = MeanFlowLoss(TimePairSampler(UniformTime(), equal_fraction=0.5), target, weighting)
    for step in range(steps):
        x = data.sample(256, generator=gen)
        loss, metrics = mf(student, x, teacher=teacher, step=step, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    noise = torch.randn(4000, 2, generator=gen)
    return sample_meanflow(student, noise, 1), metrics


MEAN, STD = torch.tensor([1.5, -1.0]), 0.5


def test_one_step_student_from_data():
    # The original MeanFlow: no teacher, v = eps - x, differential target, adaptive weight.
    # The bootstrapped target converges slowly (the 1-step spread is still short of the
    # data's after 500 steps), so this checks the mean and a loose spread.
    data = GaussianMixture.isotropic(MEAN[None], std=STD)
    samples, metrics = _train(None, data, DifferentialTarget())
    torch.testing.assert_close(samples.mean(0), MEAN, atol=0.12, rtol=0)
    assert ((samples.std(0) > 0.3) & (samples.std(0) < 0.6)).all(), samples.std(0)
    assert all(not v.requires_grad for v in metrics.values())
    assert {"loss", "mse", "target_rms", "weight_mean", "frac_r_neq_t"} <= set(metrics)


def test_one_step_student_distilled_from_teacher():
    # The same loss with the exact teacher and its ODE target learns the 1-step map closely.
    data = GaussianMixture.isotropic(MEAN[None], std=STD)
    samples, _ = _train(data, data, TeacherODETarget(steps=4), AdaptiveWeight(p=0), steps=1000)
    torch.testing.assert_close(samples.mean(0), MEAN, atol=0.08, rtol=0)
    torch.testing.assert_close(samples.std(0), torch.full((2,), STD), atol=0.06, rtol=0)


def test_state_dict_carries_the_warmup_phase():
    student = MLPStudent(2).to(F64)
    gmm = GaussianMixture.isotropic(torch.tensor([[0.0, 1.0]]), std=0.5)
    make = lambda: MeanFlowLoss(target=WarmupTarget(TeacherODETarget(steps=2), switch_step=2))  # noqa: E731
    mf = make()
    x = gmm.sample(8, dtype=F64)
    for step in (1, 2):
        _, metrics = mf(student, x, teacher=gmm, step=step)
    resumed = make()
    resumed.load_state_dict(mf.state_dict())
    assert resumed.target.phase == "differential" == mf.target.phase
    assert metrics["warmup_phase"] == 2.0


def test_nonfinite_loss_is_reported():
    x = torch.zeros(4, 2)
    bad = lambda z, r, t: z * float("nan")  # noqa: E731
    with pytest.raises(FloatingPointError, match="non-finite loss in 4 of 4"):
        MeanFlowLoss(target=DifferentialTarget("fd"))(bad, x)
    with pytest.raises(FloatingPointError, match="non-finite"):
        FlowMatchingLoss()(lambda z, t: z * float("inf"), x)


def test_bad_input():
    student = MLPStudent(2)
    with pytest.raises(TypeError, match="x"):
        MeanFlowLoss()(student, torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="noise"):
        MeanFlowLoss()(student, torch.zeros(4, 2), noise=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="teacher output"):
        MeanFlowLoss()(student, torch.zeros(4, 2), teacher=lambda z, t: z[:, :1])
    with pytest.raises(ValueError, match="model output"):
        FlowMatchingLoss()(lambda z, t: z[:1], torch.zeros(4, 2))
    with pytest.raises(ValueError, match="t must"):
        FlowMatchingLoss()(lambda z, t: z, torch.zeros(4, 2), t=torch.full((4,), 2.0))
    with pytest.raises(ValueError, match="p must"):
        AdaptiveWeight(p=-1)
    with pytest.raises(ValueError, match="c must"):
        AdaptiveWeight(c=0)


def test_exact_average_velocity_attracts_semi_gradient_training():
    # Student = exact average velocity of a Gaussian's flow + theta . features. The
    # differential target's stop-gradient makes training a fixed-point iteration; from a
    # perturbed start it must return to theta = 0 (no sign error, a stable fixed point).
    mu, s = torch.tensor([1.5, -1.0], dtype=F64), 0.5
    data = GaussianMixture.isotropic(mu[None], std=s)

    def sigma(t):
        return ((1 - t) ** 2 * s**2 + t**2).sqrt()

    def exact(z, r, t):
        r_, t_ = r[:, None], t[:, None]
        z_r = (1 - r_) * mu + sigma(r_) / sigma(t_) * (z - (1 - t_) * mu)
        gap = t_ - r_
        return torch.where(gap > 0, (z - z_r) / gap.clamp_min(1e-12), data.velocity(z, t))

    start = torch.tensor([0.3, -0.2, 0.25, 0.1], dtype=F64)
    theta = torch.nn.Parameter(start.clone())

    def student(z, r, t):
        gap = (t - r)[:, None]
        feats = (z, z * t[:, None], z * gap, gap * torch.ones_like(z))
        return exact(z, r, t) + sum(th * f for th, f in zip(theta, feats, strict=True))

    opt = torch.optim.SGD([theta], lr=0.05)
    mf = MeanFlowLoss(
        TimePairSampler(UniformTime(), equal_fraction=0.25),
        DifferentialTarget(),
        AdaptiveWeight(p=0),
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss, _ = mf(
            student, data.sample(256, generator=gen, dtype=F64), teacher=data, generator=gen
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert theta.detach().norm() < 0.25 * start.norm(), theta


# --------------------------------------------------------------------------- the published loss

UNGUIDED_CASES = [k for k, v in peer_data()["cases"].items() if not v["guided"]]


@pytest.mark.parametrize("key", UNGUIDED_CASES)
def test_unguided_loss_matches_every_peer_and_the_equations(key):
    # py-meanflow, the JAX reference, FastGen and zhuyu-cs on the same fixed fp64 inputs,
    # with L2 and adaptive weights (p, c) = (1, 1e-3), (1, 1e-2), (0.5, 1).
    case, d = peer_data()["cases"][key], peer_inputs()
    student = peer_student()
    weighting = AdaptiveWeight(case["p"], case["c"])
    loss, _ = MeanFlowLoss(weighting=weighting)(
        student, d["x"], noise=d["eps"], cond={"y": d["y"]}, r=d["r"], t=d["t"]
    )
    z_t = sample_path(d["x"], d["eps"], d["t"])
    point = FlowPoint(z_t, d["r"], d["t"], d["eps"] - d["x"], {"y": d["y"]})
    out = DifferentialTarget()(student, point)
    for peer, ref in case["peers"].items():
        expected = torch.tensor(ref["loss"], dtype=F64)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0, msg=peer)
        expected = torch.tensor(ref["u_tgt"], dtype=F64)
        torch.testing.assert_close(out.target, expected, rtol=1e-12, atol=1e-12, msg=peer)
    ref_loss, u_tgt, _ = reference_loss(
        student, d["x"], d["eps"], d["r"], d["t"], d["y"], p=case["p"], c=case["c"]
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(u_tgt, out.target, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), p=st.floats(0, 2), c=st.floats(1e-4, 1.0))
def test_unguided_loss_is_eqs_10_and_22(seed, p, c):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"W1": (3, 5), "wt": (5,), "wh": (5,), "E": (2, 5), "b1": (5,), "W2": (5, 3)}
    weights = {k: torch.randn(s, generator=gen, dtype=F64) for k, s in shapes.items()}
    student = TinyStudent({**weights, "b2": torch.randn(3, generator=gen, dtype=F64)})
    x, eps = torch.randn(2, 10, 3, generator=gen, dtype=F64)
    t = torch.rand(10, generator=gen, dtype=F64)
    r = torch.where(torch.rand(10, generator=gen) < 0.5, t, t * torch.rand(10, generator=gen))
    y = torch.randint(0, 2, (10,), generator=gen)
    loss, _ = MeanFlowLoss(weighting=AdaptiveWeight(p, c))(
        student, x, noise=eps, cond={"y": y}, r=r, t=t
    )
    ref, _, _ = reference_loss(student, x, eps, r, t, y, p=p, c=c)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- fixed times


def test_fixed_times_replace_the_sampler():
    student = MLPStudent(2).to(F64)
    gen = torch.Generator().manual_seed(0)
    x, noise = torch.randn(2, 8, 2, generator=gen, dtype=F64)
    t = torch.rand(8, generator=gen, dtype=F64)
    r = t * torch.rand(8, generator=gen, dtype=F64)
    fixed, _ = MeanFlowLoss()(student, x, noise=noise, r=r, t=t)
    sampled, metrics = MeanFlowLoss(_fixed_pairs(r, t))(student, x, noise=noise)
    assert torch.equal(fixed, sampled) and metrics["frac_r_neq_t"] == 1.0
    state = gen.get_state()
    MeanFlowLoss()(student, x, noise=noise, r=r, t=t, generator=gen)
    assert torch.equal(gen.get_state(), state)  # no time drawn


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        ({"t": torch.full((4,), 0.5)}, ValueError, "r and t together"),
        ({"r": torch.full((4,), 0.5)}, ValueError, "r and t together"),
        ({"r": torch.full((4,), 0.6), "t": torch.full((4,), 0.5)}, ValueError, "r <= t"),
        ({"r": torch.zeros(4), "t": torch.full((4,), 1.5)}, ValueError, "t must lie"),
        ({"r": torch.full((4,), -0.1), "t": torch.ones(4)}, ValueError, "r must lie"),
        ({"r": torch.zeros(3), "t": torch.ones(3)}, ValueError, "t must have shape"),
        ({"r": torch.zeros(4, 1), "t": torch.ones(4, 1)}, ValueError, "t must have shape"),
        ({"r": torch.zeros(4), "t": torch.ones(4, dtype=torch.int64)}, TypeError, "t must"),
        ({"r": 0.0, "t": torch.ones(4)}, TypeError, "r must"),
        ({"r": torch.zeros(4), "t": torch.full((4,), float("nan"))}, ValueError, "t must"),
    ],
)
def test_fixed_times_are_validated(kw, exc, match):
    with pytest.raises(exc, match=match):
        MeanFlowLoss()(MLPStudent(2), torch.zeros(4, 2), **kw)


# --------------------------------------------------------------------------- host syncs


def test_a_default_call_reads_the_host_once_and_a_foreign_sampler_twice():
    from tests._syncs import count_host_reads

    student, x = MLPStudent(2), torch.randn(16, 2)
    gen = torch.Generator().manual_seed(0)

    def foreign(batch, **kw):
        t = torch.rand(batch, generator=kw["generator"])
        return 0.5 * t, t

    for loss_fn, reads_expected in ((MeanFlowLoss(), 1), (MeanFlowLoss(foreign), 2)):
        with count_host_reads() as reads:
            loss_fn(student, x, generator=gen)
        assert len(reads) == reads_expected, reads  # the finite-loss check (+ the draw's)
    with count_host_reads() as reads:
        MeanFlowLoss(target=TeacherODETarget(steps=2))(student, x, teacher=lambda z, t: -z)
    # + the count of the pairs with r < t, the only ones the teacher integrates (issue 19)
    assert reads == ["aten.nonzero", "aten._local_scalar_dense"], reads


def test_trusted_fixed_times_give_the_same_loss_without_their_check():
    from tests._syncs import count_host_reads

    student, x = MLPStudent(2).double(), torch.randn(16, 2, dtype=torch.float64)
    noise, t = torch.randn_like(x), torch.rand(16, dtype=torch.float64)
    r = t * torch.rand(16, dtype=torch.float64)
    checked, _ = MeanFlowLoss()(student, x, noise=noise, r=r, t=t, step=3)
    with count_host_reads() as reads:
        trusted, _ = MeanFlowLoss()(student, x, noise=noise, r=r, t=t, step=3, validate=False)
    assert reads == ["aten._local_scalar_dense"]  # the finite-loss check alone
    assert torch.equal(trusted, checked)
    with pytest.raises(ValueError, match="r must satisfy r <= t"):
        MeanFlowLoss()(student, x, noise=noise, r=t, t=r)
