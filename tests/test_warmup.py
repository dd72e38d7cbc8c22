"""The warm-up switch's target-agreement signals, gate and guard on exactly solvable flows.

The data is a Gaussian ``N(mu, s^2 I)``: its flow is affine, so the exact average velocity is
closed form, ``z_r = (1 - r) mu + (z_t - (1 - t) mu) sigma_r / sigma_t`` with
``sigma_t^2 = (1 - t)^2 s^2 + t^2``, and every signal has a known value.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mfcore.losses import AdaptiveWeight, MeanFlowLoss
from mfcore.path import FlowPoint
from mfcore.switch_signals import agreement_sums
from mfcore.targets import DifferentialTarget, TeacherODETarget
from mfcore.time import TimePairSampler, UniformTime
from mfcore.warmup import (
    DEFAULT_GAP_EDGES,
    AgreementSignals,
    SwitchGate,
    SwitchGuard,
    SwitchRollback,
    WarmupTarget,
    gap_bin_names,
    target_agreement,
)

F64 = torch.float64
MU, S = torch.tensor([0.7, -0.4], dtype=F64), 0.3


def sigma(t):
    return ((1 - t) ** 2 * S**2 + t**2).sqrt()


def velocity(z, t):
    """The exact velocity of the Gaussian's flow (a teacher)."""
    tt = t[:, None]
    dsig = (-(1 - tt) * S**2 + tt) / sigma(tt)
    return -MU + (z - (1 - tt) * MU) * dsig / sigma(tt)


def exact_u(z, r, t):
    """The exact average velocity over ``[r, t]`` (``v`` where ``r = t``)."""
    rr, tt = r[:, None], t[:, None]
    z_r = (1 - rr) * MU + (z - (1 - tt) * MU) * sigma(rr) / sigma(tt)
    gap = tt - rr
    safe = torch.where(gap > 0, gap, torch.ones_like(gap))
    return torch.where(gap > 0, (z - z_r) / safe, velocity(z, t))


class Perturbed(nn.Module):
    """``u* + W g(t)``: the exact field plus a trainable perturbation of a fixed shape.

    With ``g = exp(c (1 - t))`` the differential target feeds back
    ``-(t - r) dg/dt W = c (t - r) g W``: where ``c (t - r) > 1`` semi-gradient training on
    it *grows* ``W`` while the values still fit; with ``c < 0`` it shrinks ``W``.
    """

    def __init__(self, w: float, c: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((2,), w, dtype=F64))
        self.c = c

    def forward(self, z, r, t):
        return exact_u(z, r, t) + self.w * torch.exp(self.c * (1 - t))[:, None]


def batch(seed, n=256):
    gen = torch.Generator().manual_seed(seed)
    x = MU + S * torch.randn(n, 2, generator=gen, dtype=F64)
    return x


def pairs():
    return TimePairSampler(UniformTime(), equal_fraction=0.25)


DISCRETE = TeacherODETarget(steps=16, method="rk4")


def test_the_velocity_is_the_derivative_of_the_flow():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(8, 2, dtype=F64, generator=gen)
    t = torch.rand(8, dtype=F64, generator=gen) * 0.9 + 0.05
    h = 1e-5

    def flow(s):  # the state at time s of the path through z at t
        return (1 - s)[:, None] * MU + (z - (1 - t)[:, None] * MU) * (sigma(s) / sigma(t))[:, None]

    # a central difference: error O(h^2) ~ 1e-10 plus fp64 rounding / h ~ 1e-11
    slope = (flow(t + h) - flow(t - h)) / (2 * h)
    torch.testing.assert_close(slope, velocity(z, t), rtol=1e-8, atol=1e-8)


# --------------------------------------------------------------------------- signals


def test_exact_field_gives_delta_near_zero_and_rho_one():
    x = batch(0)
    gen = torch.Generator().manual_seed(1)
    r, t = pairs()(x.shape[0], dtype=F64, generator=gen)
    noise = torch.randn(x.shape, generator=gen, dtype=F64)
    z = (1 - t)[:, None] * x + t[:, None] * noise
    v = velocity(z, t)
    pred = exact_u(z, r, t)
    u_disc = DISCRETE.compute(None, FlowPoint(z, r, t, v), teacher=velocity)
    u_diff = DifferentialTarget().compute(exact_u, FlowPoint(z, r, t, v))
    sig = target_agreement(pred, u_disc, u_diff, r, t)
    assert sig.delta < 1e-6  # the RK4 secant's own error
    assert sig.rho == pytest.approx(1.0, abs=1e-6)  # u_diff = u exactly
    assert set(sig.rho_bins) <= set(gap_bin_names())
    for name in sig.rho_bins:
        assert sig.rho_bins[name] == pytest.approx(1.0, abs=1e-5)


def test_exact_field_opens_the_gate():
    gate = SwitchGate(delta_max=0.05, rho_max=1.5, patience=3)
    w = WarmupTarget(DISCRETE, gate=gate, every=1)
    loss = MeanFlowLoss(pairs(), w, AdaptiveWeight(p=0))
    student = Perturbed(0.0, 1.0)
    phases = []
    for step in range(6):
        _, m = loss(student, batch(step), teacher=velocity, step=step)
        phases.append(w.phase)
        if w.switched_at is None:
            assert float(m["agree_rho"]) == pytest.approx(1.0, abs=1e-5)
    # three evaluations hold (steps 0-2), so the switch fires at step 3
    assert phases == ["discrete"] * 3 + ["differential"] * 3
    assert w.switched_at == 3 and w.events == [(3, "switch")]


def test_corrupted_derivative_with_fitting_values_keeps_the_gate_closed():
    student = Perturbed(1e-3, 5.0)  # values off by <= 0.15, du/dt by up to 5x that
    w = WarmupTarget(DISCRETE, gate=SwitchGate(), every=1)
    loss = MeanFlowLoss(pairs(), w, AdaptiveWeight(p=0))
    for step in range(8):
        _, m = loss(student, batch(step), teacher=velocity, step=step)
        assert w.phase == "discrete"
    assert w.fit_error < 1e-3  # the values fit, and the targets are close in absolute terms,
    assert float(m["agree_delta"]) < 0.05
    # ... but on long intervals the differential target points 3x further from the discrete
    # one than the student does (pooled, the short intervals dilute it: per bin matters)
    assert float(m["agree_rho/gap<=1"]) > 2.5 and float(m["gate_streak"]) == 0.0


# --------------------------------------------------------------------------- guard


def long_pairs():
    """Long intervals only (``t`` near noise, ``r`` near data), where the feedback of
    ``Perturbed(c > 1)`` grows."""
    return TimePairSampler(UniformTime(0.8, 1.0), UniformTime(0.0, 0.2), equal_fraction=0.0)


def _train(student, w, steps, lr=0.05, start=0):
    loss = MeanFlowLoss(long_pairs(), w, AdaptiveWeight(p=0))
    opt = torch.optim.SGD(student.parameters(), lr=lr)
    history = []
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(step)
        value, m = loss(student, batch(step), teacher=velocity, step=step, generator=gen)
        opt.zero_grad()
        value.backward()
        opt.step()
        history.append({k: float(v) for k, v in m.items()})
    return history


def test_guard_reverts_a_student_whose_derivative_is_corrupted():
    torch.manual_seed(0)
    student = Perturbed(0.02, 5.0)
    guard = SwitchGuard(margin=0.25, patience=2)
    w = WarmupTarget(DISCRETE, switch_step=1, guard=guard, every=5)
    history = _train(student, w, 120)
    reverted = [i for i, m in enumerate(history) if m.get("warmup_reverted")]
    assert len(reverted) == 1, reverted
    assert w.phase == "discrete" and [k for _, k in w.events] == ["switch", "revert"]
    # the drift it caught: the differential target grows the perturbation
    errors = [m["guard_error"] for m in history[: reverted[0] + 1] if "guard_error" in m]
    assert errors[-1] > 1.25 * history[reverted[0]]["guard_ref"]
    # locked: without a gate, one revert ends the switching
    assert all(m["warmup_phase"] == 0.0 for m in history[reverted[0] + 1 :])


def test_guard_leaves_a_healthy_student_alone():
    torch.manual_seed(0)
    student = Perturbed(0.05, -1.0)  # g = exp(t): the differential target shrinks W
    w0 = float(student.w.detach().abs().max())
    w = WarmupTarget(DISCRETE, switch_step=1, guard=SwitchGuard(), every=5)
    history = _train(student, w, 150)
    assert not any(m.get("warmup_reverted") for m in history)
    assert w.phase == "differential"
    assert float(student.w.detach().abs().max()) < 0.5 * w0  # it improved on the new target


def test_state_dict_round_trips_mid_guard():
    torch.manual_seed(0)
    guard = SwitchGuard(margin=0.25, patience=3)
    a = WarmupTarget(DISCRETE, switch_step=1, guard=guard, every=2, gate=None)
    student_a = Perturbed(0.02, 5.0)
    _train(student_a, a, 3, lr=0.01)
    assert a.switched_at == 1 and a._held is not None and a._guard_streak == 1
    state = {k: (v.copy() if isinstance(v, dict) else v) for k, v in a.state_dict().items()}
    b = WarmupTarget(DISCRETE, switch_step=1, guard=guard, every=2)
    b.load_state_dict(state)
    student_b = Perturbed(0.0, 5.0)
    student_b.load_state_dict(student_a.state_dict())
    rest_a = _train(student_a, a, 20, lr=0.01, start=3)
    rest_b = _train(student_b, b, 20, lr=0.01, start=3)
    assert rest_a == rest_b
    assert a.events == b.events and any(k == "revert" for _, k in a.events)


def test_old_states_load():
    w = WarmupTarget(DISCRETE, switch_step=3)
    w.load_state_dict(
        {"step": 5, "switched_at": 3, "fit_error": 0.1, "discrete": {}, "differential": {}}
    )
    assert w.phase == "differential" and w.fit_error == pytest.approx(0.1)


# --------------------------------------------------------------------------- identities


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 10_000),
    st.floats(0.01, 100.0),
    st.integers(2, 40),
)
def test_signals_are_scale_free_and_pool_as_sums(seed, scale, n):
    gen = torch.Generator().manual_seed(seed)
    pred, u_disc, u_diff = torch.randn(3, n, 3, generator=gen, dtype=F64).unbind(0)
    t = torch.rand(n, generator=gen, dtype=F64)
    r = t * torch.rand(n, generator=gen, dtype=F64)
    r[0] = t[0]  # one r = t pair: left out
    a = target_agreement(pred, u_disc, u_diff, r, t)
    b = target_agreement(scale * pred, scale * u_disc, scale * u_diff, r, t)
    assert b.delta == pytest.approx(a.delta, rel=1e-9)
    assert b.rho == pytest.approx(a.rho, rel=1e-9)
    # rho = 1 when the differential target is the prediction
    assert target_agreement(pred, u_disc, pred, r, t).rho == pytest.approx(1.0, rel=1e-12)
    # pooled = the sums of the halves
    h = n // 2
    edges = torch.tensor(DEFAULT_GAP_EDGES, dtype=F64)
    whole = agreement_sums(pred, u_disc, u_diff, r, t, edges=edges)
    parts = agreement_sums(pred[:h], u_disc[:h], u_diff[:h], r[:h], t[:h], edges=edges)
    parts = parts + agreement_sums(pred[h:], u_disc[h:], u_diff[h:], r[h:], t[h:], edges=edges)
    torch.testing.assert_close(whole, parts, rtol=1e-12, atol=1e-12)
    sig = AgreementSignals.from_sums(whole.tolist(), gap_bin_names())
    assert sig.delta == pytest.approx(a.delta, rel=1e-12)
    assert sum(sig.counts.values()) == int((t > r).sum())
    gap = (t - r)[t > r]
    expected = math.sqrt(
        float((u_diff - u_disc)[t > r].pow(2).sum() / (pred - u_disc)[t > r].pow(2).sum())
    )
    assert a.rho == pytest.approx(expected, rel=1e-12) and gap.numel() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="never switches"):
        WarmupTarget(DISCRETE)
    with pytest.raises(ValueError, match="every"):
        WarmupTarget(DISCRETE, gate=SwitchGate(), every=None)
    with pytest.raises(TypeError, match="gate"):
        WarmupTarget(DISCRETE, gate={"delta_max": 1.0})
    with pytest.raises(ValueError, match="delta_max"):
        SwitchGate(delta_max=float("inf"))
    with pytest.raises(ValueError, match="margin"):
        SwitchGuard(margin=-0.1)
    with pytest.raises(ValueError, match="edges"):
        WarmupTarget(DISCRETE, switch_step=1, edges=(0.0, 0.5, 0.4, 1.0))
    z = torch.randn(4, 2)
    t = torch.rand(4)
    with pytest.raises(ValueError, match="u_diff"):
        target_agreement(z, z, z[:, :1], t * 0.5, t)
    with pytest.raises(ValueError, match="r <= t"):
        target_agreement(z, z, z, t, t * 0.5 - 0.01 * (t == 0))


def test_rollback_restores_the_switch_state_and_round_trips():
    torch.manual_seed(0)
    student = Perturbed(0.02, 5.0)
    w = WarmupTarget(DISCRETE, switch_step=1, guard=SwitchGuard(patience=2), every=5)
    loss = MeanFlowLoss(long_pairs(), w, AdaptiveWeight(p=0))
    opt = torch.optim.Adam(student.parameters(), lr=0.01)
    rollback = SwitchRollback(opt, device="cpu")
    at_switch = rolled_at = None
    for step in range(40):
        gen = torch.Generator().manual_seed(step)
        value, m = loss(student, batch(step), teacher=velocity, step=step, generator=gen)
        if "warmup_switched" in m:
            at_switch = (
                student.w.detach().clone(),
                opt.state_dict()["state"][0]["exp_avg"].clone(),
            )
            assert rollback.state_dict()["saved"] is None
        if rollback.observe(m):
            rolled_at = step
            assert torch.equal(student.w.detach(), at_switch[0])
            assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], at_switch[1])
            continue
        if at_switch is not None and rolled_at is None:
            # mid-guard: a fresh rollback object restored from the state can roll back too
            copy = SwitchRollback(opt)
            copy.load_state_dict(rollback.state_dict())
            assert torch.equal(copy.saved["params"][0], at_switch[0])
        opt.zero_grad()
        value.backward()
        opt.step()
    assert rolled_at is not None and w.phase == "discrete"
    with pytest.raises(TypeError, match="optimizer"):
        SwitchRollback(None)
    with pytest.raises(TypeError, match="also"):
        SwitchRollback(opt, also=(object(),))
