"""Alignment critics: re-noising identities, the surrogate's gradient, the kernel estimates,
the direction of every critic on a Gaussian student, AlignmentLoss state and errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mfcore.critics import (
    AlignmentLoss,
    FakeVelocityCritic,
    KernelCritic,
    MeanFlowCritic,
    kernel_discrepancy,
    renoise,
    renoise_velocity,
    renoise_weight,
    surrogate_loss,
)
from mfcore.fields import Critic, SampleCritic, TrainedCritic
from mfcore.toys.gmm import GaussianMixture
from mfcore.toys.metrics import mmd as reference_mmd

F64 = torch.float64
TEACHER_MEAN = (1.0, -0.5)
TEACHER_STD = 0.5

times = st.floats(0.0, 0.95)
fractions = st.floats(0.01, 1.0)


# --------------------------------------------------------------------------- helpers


class GaussianStudent(nn.Module):
    """The exact mean-velocity field of ``N(mu, sigma^2 I)``: a learnable Gaussian student.

    On the path ``z_t = (1 - t) x + t e`` the flow map is affine:
    ``z_r = (1 - r) mu + c(r) / c(t) (z_t - (1 - t) mu)``, ``c(t)^2 = (1 - t)^2 sigma^2 + t^2``.
    """

    def __init__(self, mu=(0.0, 0.0), sigma=1.0, dtype=torch.float32) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mu, dtype=dtype))
        self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma), dtype=dtype))

    def _c(self, t):
        return ((1 - t) ** 2 * torch.exp(2 * self.log_sigma) + t**2).sqrt()

    def forward(self, z, r, t):
        rr, tt = r[:, None], t[:, None]
        z_r = (1 - rr) * self.mu + self._c(rr) / self._c(tt) * (z - (1 - tt) * self.mu)
        return (z - z_r) / (tt - rr)


class ExactFake(nn.Module):
    """The closed-form velocity of the student's current Gaussian (detached)."""

    def __init__(self, student: GaussianStudent) -> None:
        super().__init__()
        self._student = [student]
        self.unused = nn.Parameter(torch.zeros(()))  # an optimiser needs a parameter

    def forward(self, z, t):
        s = self._student[0]
        mu, var, tt = s.mu.detach(), torch.exp(2 * s.log_sigma.detach()), t[:, None]
        c2 = (1 - tt) ** 2 * var + tt**2
        return -mu + (tt - (1 - tt) * var) / c2 * (z - (1 - tt) * mu)


class VelocityMLP(nn.Module):
    def __init__(self, dim: int = 2, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )
        self.out = nn.Linear(hidden, dim)

    def forward(self, z, t):
        return self.out(self.net(torch.cat([z, t[:, None]], dim=1)))


def _teacher(dtype=torch.float32):
    return GaussianMixture.isotropic(torch.tensor([TEACHER_MEAN], dtype=F64), TEACHER_STD)


def _distance(student: GaussianStudent) -> float:
    mu_err = (student.mu.detach().double() - torch.tensor(TEACHER_MEAN, dtype=F64)).norm()
    sigma_err = abs(float(student.log_sigma.detach()) - math.log(TEACHER_STD))
    return float(mu_err) + sigma_err


def _train(critic, *, iters, steps=2, batch=128, lr=3e-2, reference=False, seed=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    student = GaussianStudent()
    if isinstance(critic, type):  # an exact fake needs the student
        critic = critic(ExactFake(student))
    teacher = _teacher()
    align = AlignmentLoss(critic, steps=steps, critic_updates=3)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    start = _distance(student)
    for _ in range(iters):
        noise = torch.randn(batch, 2, generator=gen)
        if isinstance(critic, TrainedCritic) and not isinstance(critic.fake, ExactFake):
            align.critic_step(student, noise, generator=gen)
        ref = teacher.sample(batch, generator=gen) if reference else None
        loss, _ = align.student_loss(student, noise, teacher=teacher, reference=ref, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return start, _distance(student)


# --------------------------------------------------------------------------- re-noising


@settings(max_examples=40, deadline=None)
@given(r=times, frac=fractions, seed=st.integers(0, 2**16))
def test_renoise_coefficients_and_endpoints(r, frac, seed):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(3, 2, generator=gen, dtype=F64)
    eps = torch.randn(3, 2, generator=gen, dtype=F64)
    rr = torch.full((3,), r, dtype=F64)
    s = rr + (1 - rr) * frac
    # s = r is the identity; the noise enters with sigma, z with a = (1 - s) / (1 - r)
    torch.testing.assert_close(renoise(z, rr, rr, eps), z, rtol=0, atol=1e-12)
    a = (1 - s) / (1 - rr)
    sigma = renoise(torch.zeros_like(z), rr, s, eps) / eps
    torch.testing.assert_close(renoise(z, rr, s, torch.zeros_like(eps)), a[:, None] * z)
    # the marginal variance: a^2 r^2 + sigma^2 = s^2, so (1 - s) x + s e' stays on the path
    torch.testing.assert_close((a * rr) ** 2 + sigma[:, 0] ** 2, s**2)
    torch.testing.assert_close(renoise_weight(rr, s), sigma[:, 0] ** 2 / s**2)


@settings(max_examples=40, deadline=None)
@given(r=times, frac=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_renoise_velocity_is_the_derivative_in_s(r, frac, seed):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(4, 3, generator=gen, dtype=F64)
    eps = torch.randn(4, 3, generator=gen, dtype=F64)
    rr = torch.full((4,), r, dtype=F64)
    s = rr + (1 - rr) * frac
    h = 1e-6
    fd = (renoise(z, rr, s + h, eps) - renoise(z, rr, s - h, eps)) / (2 * h)
    torch.testing.assert_close(renoise_velocity(z, rr, s, eps), fd, rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(s=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_renoise_from_data_is_the_flow_matching_path(s, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 2, generator=gen, dtype=F64)
    eps = torch.randn(5, 2, generator=gen, dtype=F64)
    r, ss = torch.zeros(5, dtype=F64), torch.full((5,), s, dtype=F64)
    torch.testing.assert_close(renoise(x, r, ss, eps), (1 - s) * x + s * eps)
    torch.testing.assert_close(renoise_velocity(x, r, ss, eps), eps - x)
    torch.testing.assert_close(renoise_weight(r, ss), torch.ones_like(ss))


def test_renoised_path_state_keeps_the_path_marginal():
    # z_r = (1 - r) x + r e re-noised to s equals (1 - s) x + s e' with e' standard normal
    gen = torch.Generator().manual_seed(0)
    n, r, s = 200_000, 0.3, 0.7
    x = torch.randn(n, 1, generator=gen, dtype=F64) * 0.2 + 1.0
    e, eps = (torch.randn(n, 1, generator=gen, dtype=F64) for _ in range(2))
    rr, ss = torch.full((n,), r, dtype=F64), torch.full((n,), s, dtype=F64)
    e_new = (renoise((1 - r) * x + r * e, rr, ss, eps) - (1 - s) * x) / s
    assert abs(float(e_new.mean())) < 0.01
    assert abs(float(e_new.std()) - 1.0) < 0.01


# --------------------------------------------------------------------------- surrogate, kernels


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_surrogate_injects_the_gradient(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, generator=gen, dtype=F64, requires_grad=True)
    g = torch.randn(4, 3, generator=gen, dtype=F64)
    loss = surrogate_loss(x, g)
    torch.testing.assert_close(loss, 0.5 * g.square().sum(1))
    (grad,) = torch.autograd.grad(loss.sum(), x)
    torch.testing.assert_close(grad, g)


def test_mmd_matches_the_metric_implementation():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(300, 2, generator=gen, dtype=F64)
    b = torch.randn(250, 2, generator=gen, dtype=F64) * 0.7 + 0.3
    ours = float(kernel_discrepancy(a, b, kind="mmd"))
    assert ours == pytest.approx(reference_mmd(a, b), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("kind", ["mmd", "energy"])
def test_kernel_discrepancy_is_symmetric_and_grows_with_a_shift(kind):
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(400, 2, generator=gen, dtype=F64)
    b = torch.randn(400, 2, generator=gen, dtype=F64)
    d = [float(kernel_discrepancy(a, b + shift, kind=kind)) for shift in (0.0, 0.5, 1.0)]
    assert abs(d[0]) < 0.01 and d[0] < d[1] < d[2]
    sym = kernel_discrepancy(b + 0.5, a, kind=kind)
    torch.testing.assert_close(sym, kernel_discrepancy(a, b + 0.5, kind=kind))


# --------------------------------------------------------------------------- critics


def test_student_equal_to_teacher_gets_no_gradient():
    student = GaussianStudent(TEACHER_MEAN, TEACHER_STD, dtype=F64)
    align = AlignmentLoss(FakeVelocityCritic(ExactFake(student)), steps=2)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    loss, metrics = align.student_loss(student, noise, teacher=_teacher())
    loss.backward()
    assert float(metrics["align_gap_rms"]) < 1e-10
    assert student.mu.grad.abs().max() < 1e-9 and student.log_sigma.grad.abs() < 1e-9


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_exact_fake_critic_moves_the_student_to_the_teacher(steps):
    start, end = _train(FakeVelocityCritic, iters=60, steps=steps)
    assert end < 0.15 * start


def test_exact_mean_flow_critic_moves_the_student_to_the_teacher():
    start, end = _train(MeanFlowCritic, iters=60)
    assert end < 0.15 * start


def test_learned_fake_critic_moves_the_student_to_the_teacher():
    torch.manual_seed(0)
    start, end = _train(FakeVelocityCritic(VelocityMLP(), lr=3e-3), iters=60)
    assert end < 0.3 * start


def test_learned_mean_flow_critic_moves_the_student_to_the_teacher():
    torch.manual_seed(0)
    critic = MeanFlowCritic(VelocityMLP(), lr=3e-3, ode_steps=2)
    start, end = _train(critic, iters=60)
    assert end < 0.3 * start


@pytest.mark.parametrize("kind", ["mmd", "energy"])
def test_kernel_critic_moves_the_student_to_the_teacher(kind):
    start, end = _train(KernelCritic(kind), iters=60, batch=256, reference=True)
    assert end < 0.3 * start


def test_mean_flow_critic_with_one_euler_step_is_the_fake_velocity_critic():
    student = GaussianStudent((0.3, 0.1), 0.8, dtype=F64)
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    losses = []
    for critic in (
        FakeVelocityCritic(ExactFake(student)),
        MeanFlowCritic(ExactFake(student), ode_steps=1, method="euler"),
    ):
        align = AlignmentLoss(critic, steps=2)
        gen = torch.Generator().manual_seed(5)
        losses.append(align.student_loss(student, noise, teacher=_teacher(), generator=gen)[0])
    torch.testing.assert_close(losses[0], losses[1])


def test_weighting_scales_the_injected_gradient():
    student = GaussianStudent((0.3, 0.1), 0.8, dtype=F64)
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    values = []
    for weighting in (None, lambda sq_err, r, t: torch.full_like(sq_err, 3.0)):
        align = AlignmentLoss(FakeVelocityCritic(ExactFake(student)), weighting=weighting)
        gen = torch.Generator().manual_seed(5)
        values.append(align.student_loss(student, noise, teacher=_teacher(), generator=gen)[0])
    torch.testing.assert_close(values[1], 9.0 * values[0])  # the loss is ||g||^2 / 2


def test_weighting_sees_the_gap_and_the_segment_and_the_former_signature_still_works():
    student = GaussianStudent((0.3, 0.1), 0.8, dtype=F64)
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    seen = []

    def weighting(sq_err, r, t):
        seen.append((sq_err, r, t))
        return 1.0 / (sq_err + 1.0)

    def loss_with(w):
        align = AlignmentLoss(FakeVelocityCritic(ExactFake(student)), steps=2, weighting=w)
        gen = torch.Generator().manual_seed(5)
        return align.student_loss(student, noise, teacher=_teacher(), generator=gen)[0]

    loss_with(weighting)
    assert len(seen) == 2  # one call per segment
    for (sq_err, r, t), (lo, hi) in zip(seen, [(0.5, 1.0), (0.0, 0.5)], strict=True):
        assert sq_err.shape == (32,) and bool((sq_err >= 0).all())
        assert bool((r == lo).all()) and bool((t > r).all() & (t <= hi).all())  # t = s
    with pytest.warns(FutureWarning, match=r"weighting\(s, r\) is deprecated"):
        old = AlignmentLoss(FakeVelocityCritic(ExactFake(student)), weighting=lambda s, r: s - r)
    new = AlignmentLoss(
        FakeVelocityCritic(ExactFake(student)), weighting=lambda sq_err, r, t: t - r
    )
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(
        old.student_loss(student, noise, teacher=_teacher(), generator=gen_a)[0],
        new.student_loss(student, noise, teacher=_teacher(), generator=gen_b)[0],
    )


def test_the_critics_are_typed_by_their_protocols():
    fake, kernel = FakeVelocityCritic(VelocityMLP()), KernelCritic()
    assert isinstance(fake, TrainedCritic) and not isinstance(fake, SampleCritic)
    assert isinstance(kernel, SampleCritic) and not isinstance(kernel, TrainedCritic)
    assert isinstance(MeanFlowCritic(VelocityMLP()), TrainedCritic)

    class Zero:  # a user's critic: the protocol, nothing else
        def alignment_loss(self, z_r, r, t, **kw):
            return (0.0 * z_r).sum(), {"zero": torch.zeros(())}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    assert isinstance(Zero(), Critic)
    align = AlignmentLoss(Zero(), steps=2)
    assert align.critic_step(GaussianStudent(), torch.randn(4, 2))[1] == {}
    loss, metrics = align.student_loss(GaussianStudent(), torch.randn(4, 2), teacher=_teacher())
    assert float(loss.detach()) == 0.0 and "zero" in metrics


def test_critic_fits_the_exact_velocity_of_a_gaussian_sample():
    # flow matching on re-noised states converges to the velocity of their distribution
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    student = GaussianStudent((0.5, -0.5), 0.6)
    critic = FakeVelocityCritic(VelocityMLP(), lr=3e-3)
    align = AlignmentLoss(critic, steps=2, critic_updates=4)
    for _ in range(150):
        align.critic_step(student, torch.randn(256, 2, generator=gen), generator=gen)
    z = torch.randn(512, 2, generator=gen)
    t = 0.5 + 0.5 * torch.rand(512, generator=gen)  # the first segment's re-noise range
    with torch.no_grad():
        err = (critic.fake(z, t) - ExactFake(student)(z, t)).square().sum(1).mean()
        scale = ExactFake(student)(z, t).square().sum(1).mean()
    assert float(err / scale) < 0.05


# --------------------------------------------------------------------------- AlignmentLoss


def test_state_dict_round_trip_continues_identically():
    def make():
        torch.manual_seed(3)
        return AlignmentLoss(FakeVelocityCritic(VelocityMLP()), steps=2, critic_updates=2)

    student = GaussianStudent((0.2, 0.2), 0.9)
    gen = torch.Generator().manual_seed(0)
    first = make()
    first.critic_step(student, torch.randn(64, 2, generator=gen))
    second = make()
    second.critic.fake.out.weight.data.add_(1.0)  # a different network until loaded
    second.load_state_dict(first.state_dict())
    assert second.updates_done == first.updates_done == 2
    noise = torch.randn(64, 2, generator=gen)
    results = []
    for align in (first, second):
        align.critic_step(student, noise, generator=torch.Generator().manual_seed(9))
        results.append([p.detach().clone() for p in align.critic.fake.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kernel_critic_step_is_a_no_op_and_reference_defaults_to_teacher_samples():
    align = AlignmentLoss(KernelCritic(), steps=1, teacher_steps=4)
    student = GaussianStudent()
    loss, metrics = align.critic_step(student, torch.randn(16, 2))
    assert float(loss) == 0.0 and metrics == {}
    loss, metrics = align.student_loss(student, torch.randn(16, 2), teacher=_teacher())
    assert torch.isfinite(loss) and "align_kernel" in metrics


def test_errors():
    student = GaussianStudent()
    z, r, t = torch.randn(4, 2), torch.zeros(4), torch.ones(4)
    with pytest.raises(TypeError, match="critic"):
        AlignmentLoss(object())
    with pytest.raises(ValueError, match="steps"):
        AlignmentLoss(KernelCritic(), steps=0)
    with pytest.raises(ValueError, match="grid"):
        AlignmentLoss(KernelCritic(), grid=torch.tensor([1.0, 0.5]))
    with pytest.raises(TypeError, match="weighting"):
        AlignmentLoss(KernelCritic(), weighting=3)
    with pytest.raises(TypeError, match="fake"):
        FakeVelocityCritic(lambda z, t: z)
    with pytest.raises(TypeError, match="optimizer"):
        FakeVelocityCritic(VelocityMLP(), optimizer="adam")
    with pytest.raises(ValueError, match="ode_steps"):
        MeanFlowCritic(VelocityMLP(), ode_steps=0)
    with pytest.raises(ValueError, match="kind"):
        KernelCritic("wasserstein")
    with pytest.raises(ValueError, match="bandwidths"):
        KernelCritic(bandwidths=(0.1, -1.0))
    with pytest.raises(ValueError, match="r < s"):
        renoise_velocity(z, r, r, z)
    with pytest.raises(ValueError, match="r <= s"):
        renoise(z, torch.full((4,), 0.5), r, z)
    with pytest.raises(ValueError, match="r must be < 1"):
        renoise(z, t, t, z)
    with pytest.raises(ValueError, match="noise"):
        renoise(z, r, t, torch.randn(4, 3))
    with pytest.raises(TypeError, match="noise"):
        AlignmentLoss(KernelCritic()).student_loss(student, [1.0], teacher=_teacher())
    with pytest.raises(ValueError, match="teacher"):
        AlignmentLoss(FakeVelocityCritic(VelocityMLP())).student_loss(student, z)
    with pytest.raises(ValueError, match="reference"):
        AlignmentLoss(KernelCritic()).student_loss(student, z, reference=torch.randn(3, 2))
    with pytest.raises(ValueError, match="at least 2"):
        kernel_discrepancy(z[:1], z)
    with pytest.raises(KeyError, match="optimizer"):
        FakeVelocityCritic(VelocityMLP()).load_state_dict({"fake": {}})
    with pytest.raises(KeyError, match="updates_done"):
        AlignmentLoss(KernelCritic()).load_state_dict({"critic": {}})


def test_non_finite_teacher_raises():
    def bad_teacher(z, t):
        return torch.full_like(z, float("nan"))

    align = AlignmentLoss(FakeVelocityCritic(VelocityMLP()))
    with pytest.raises(FloatingPointError):
        align.student_loss(GaussianStudent(), torch.randn(8, 2), teacher=bad_teacher)


def test_renoise_times_stay_above_r_in_bfloat16():
    # Short segments in bf16: a time cast back to bf16 would round onto r and be rejected.
    from mfcore.renoise import draw_renoise_time

    gen = torch.Generator().manual_seed(0)
    r = torch.full((4096,), 0.5, dtype=torch.bfloat16)
    s = draw_renoise_time(r, torch.ones_like(r), gen)
    assert s.dtype == torch.float32 and bool((s > r.float()).all())


def test_one_trajectory_serves_the_critic_step_and_the_student_loss():
    student = GaussianStudent((0.3, 0.1), 0.8)
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    outs = []
    for shared in (False, True):
        torch.manual_seed(0)
        align = AlignmentLoss(FakeVelocityCritic(VelocityMLP()), steps=2, critic_updates=2)
        gen = torch.Generator().manual_seed(3)
        traj = align.trajectory(student, noise) if shared else None
        critic, _ = align.critic_step(student, noise, generator=gen, trajectory=traj)
        kw = dict(teacher=_teacher(), generator=gen, trajectory=traj)
        loss, _ = align.student_loss(student, noise, **kw)
        (grad,) = torch.autograd.grad(loss, student.mu)
        outs.append((critic, loss.detach(), grad))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="attached"):
        align.student_loss(student, noise, teacher=_teacher(), trajectory=traj.detach())
    with pytest.raises(ValueError, match=r"trajectory must have shape \(K \+ 1, \*noise.shape\)"):
        align.critic_step(student, noise, trajectory=traj[:2])
