"""Classifier-free guidance, and MeanFlow's guided training held to the peers' values."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from mfcore.guidance import ClassifierFreeGuidance, MeanFlowGuidance, apg_velocity, cfg_velocity
from mfcore.losses import AdaptiveWeight, MeanFlowLoss, per_sample_sq_error, sample_path
from mfcore.path import FlowPoint
from mfcore.targets import DifferentialTarget
from tests._cfg_peers import (
    F64,
    TinyStudent,
    peer_data,
    peer_guidance,
    peer_inputs,
    peer_student,
    reference_loss,
)
from tests._nets import MLPStudent


def _model(z, t, y):
    return z * y[:, None] + t[:, None]


@settings(max_examples=20, deadline=None)
@given(scale=st.floats(0, 10), seed=st.integers(0, 1000))
def test_cfg_is_affine_in_scale(scale, seed):
    gen = torch.Generator().manual_seed(seed)
    z, t = torch.randn(3, 2, generator=gen), torch.rand(3, generator=gen)
    y = torch.randn(3, generator=gen)
    guided = ClassifierFreeGuidance(_model, scale, {"y": torch.zeros(3)})
    v_c, v_u = _model(z, t, y), _model(z, t, torch.zeros(3))
    torch.testing.assert_close(guided(z, t, y=y), v_u + scale * (v_c - v_u))
    torch.testing.assert_close(cfg_velocity(v_c, v_u, 1.0), v_c)


def test_uncond_callable_and_scale_one():
    calls = []

    def model(z, t, y):
        calls.append(y)
        return z * y[:, None]

    z, t, y = torch.ones(2, 2), torch.rand(2), torch.ones(2)
    ClassifierFreeGuidance(model, 1.0, lambda c: {"y": 0 * c["y"]})(z, t, y=y)
    assert len(calls) == 1  # scale 1 needs no unconditional pass
    out = ClassifierFreeGuidance(model, 3.0, lambda c: {"y": 0 * c["y"]})(z, t, y=y)
    torch.testing.assert_close(out, 3 * z)


def test_meanflow_guidance_mixture():
    def student(z, r, t, y):
        return z * y[:, None] + 10 * (t - r)[:, None]

    z, t, y = torch.randn(4, 2), torch.rand(4), torch.full((4,), 2.0)
    v = torch.randn(4, 2)
    g = MeanFlowGuidance(2.0, 0.5, uncond={"y": torch.zeros(4)}, label_dropout=0.0)
    out = g(v, student, z, t, {"y": y})
    expected = 2.0 * v + 0.5 * (2 * z) + (1 - 2.0 - 0.5) * torch.zeros_like(z)
    torch.testing.assert_close(out, expected)
    plain = MeanFlowGuidance(1.0, 0.0, uncond={"y": torch.zeros(4)}, label_dropout=0.0)
    torch.testing.assert_close(plain(v, student, z, t, {"y": y}), v)


def test_bad_input():
    with pytest.raises(TypeError, match="uncond"):
        ClassifierFreeGuidance(_model, 2.0, uncond=3)
    with pytest.raises(ValueError, match="v_uncond"):
        cfg_velocity(torch.zeros(2, 2), torch.zeros(2, 3), 2.0)
    with pytest.raises(TypeError, match="mapping"):
        ClassifierFreeGuidance(_model, 2.0, uncond=lambda c: 3)(
            torch.zeros(1, 1), torch.zeros(1), y=torch.zeros(1)
        )


def _guidance(**kw):
    return MeanFlowGuidance(**{"omega": 1.0, "uncond": {}, "label_dropout": 0.1, **kw})


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        ({"kappa": 1.0}, ValueError, "kappa"),
        ({"kappa": -0.1}, ValueError, "kappa"),
        ({"omega": 0.0}, ValueError, "omega"),
        ({"omega": math.inf}, ValueError, "omega"),
        ({"omega": "2"}, TypeError, "omega"),
        ({"t_min": -0.1}, ValueError, "t_min"),
        ({"t_min": 0.8, "t_max": 0.5}, ValueError, "t_max"),
        ({"t_max": 1.5}, ValueError, "t_max"),
        ({"t_max": math.nan}, ValueError, "t_max"),
        ({"label_dropout": 1.0}, ValueError, "label_dropout"),
        ({"label_dropout": -0.1}, ValueError, "label_dropout"),
        ({"label_dropout": math.nan}, ValueError, "label_dropout"),
        ({"eval_mode": 1}, TypeError, "eval_mode"),
        ({"uncond": 3}, TypeError, "uncond"),
    ],
)
def test_meanflow_guidance_rejects_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        _guidance(**kw)


@pytest.mark.parametrize(
    "uncond, cond, exc, match",
    [
        ({"y": 0}, {}, ValueError, "uncond"),  # nothing to replace rows of
        ({"flag": True}, {"y": torch.zeros(3)}, ValueError, "uncond"),
        ({"y": 0}, {"y": 1.0}, TypeError, "cond\\['y'\\]"),
        ({"y": 0}, {"y": torch.zeros(2)}, TypeError, "cond\\['y'\\]"),
        ({"y": torch.zeros(3, 5)}, {"y": torch.zeros(3, 4)}, ValueError, "broadcast"),
        ({"y": torch.zeros(2, 4)}, {"y": torch.zeros(3, 1)}, ValueError, "broadcast"),
        ({"y": "null"}, {"y": torch.zeros(3)}, TypeError, "uncond\\['y'\\]"),
        (lambda c: {}, {"y": torch.zeros(3)}, ValueError, "keep"),
    ],
)
def test_condition_rejects_what_it_cannot_drop_per_row(uncond, cond, exc, match):
    with pytest.raises(exc, match=match):
        _guidance(uncond=uncond).condition(cond, torch.tensor([True, False, False]))


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        ({"cond_drop": torch.zeros(4)}, TypeError, "cond_drop"),
        ({"cond_drop": [True] * 4}, TypeError, "cond_drop"),
        ({"cond_drop": torch.zeros(3, dtype=torch.bool)}, ValueError, "cond_drop"),
        ({"cond_drop": torch.zeros(4, 1, dtype=torch.bool)}, ValueError, "cond_drop"),
    ],
)
def test_the_loss_checks_cond_drop(kw, exc, match):
    loss_fn = MeanFlowLoss(guidance=_guidance(uncond={"y": 0}))
    with pytest.raises(exc, match=match):
        loss_fn(MLPStudent(2), torch.zeros(4, 2), **kw)


def test_cond_drop_needs_a_meanflow_guidance_and_guidance_a_callable():
    with pytest.raises(ValueError, match="cond_drop"):
        MeanFlowLoss()(MLPStudent(2), torch.zeros(4, 2), cond_drop=torch.zeros(4, dtype=bool))
    with pytest.raises(TypeError, match="guidance"):
        MeanFlowLoss(guidance=2.0)


# --------------------------------------------------------------------------- peers' semantics

GUIDED_CASES = [k for k, v in peer_data()["cases"].items() if v["guided"]]
TOL = {"rtol": 1e-12, "atol": 1e-12}


def _run(guidance, case, drop):
    """(loss, u_tgt, v_tilde) of mfcore on the peers' inputs."""
    student, d = peer_student(), peer_inputs()
    loss_fn = MeanFlowLoss(weighting=AdaptiveWeight(case["p"], case["c"]), guidance=guidance)
    cond = {"y": d["y"]}
    kw = {"noise": d["eps"], "cond": cond, "r": d["r"], "t": d["t"], "cond_drop": drop}
    loss, _ = loss_fn(student, d["x"], **kw)
    z_t = sample_path(d["x"], d["eps"], d["t"])
    v_tilde = guidance(d["eps"] - d["x"], student, z_t, d["t"], cond, drop=drop)
    student_cond = guidance.condition(cond, drop)
    out = DifferentialTarget()(student, FlowPoint(z_t, d["r"], d["t"], v_tilde, student_cond))
    return loss, out.target, v_tilde


@pytest.mark.parametrize("key", GUIDED_CASES)
def test_guided_loss_matches_every_peer(key):
    # omega/kappa in {(1, .5), (2, 0), (1.5, .3)}, 10% label dropout (sample 0 dropped, with
    # r < t), window t in [0, 0.75] (sample 2 sits on its edge), L2 and three adaptive weights.
    case = peer_data()["cases"][key]
    loss, u_tgt, v_tilde = _run(peer_guidance(key), case, peer_inputs()["drop"])
    for peer, ref in case["peers"].items():
        torch.testing.assert_close(loss, torch.tensor(ref["loss"], dtype=F64), **TOL, msg=peer)
        torch.testing.assert_close(u_tgt, torch.tensor(ref["u_tgt"], dtype=F64), **TOL, msg=peer)
        torch.testing.assert_close(v_tilde, torch.tensor(ref["v_tilde"], dtype=F64), **TOL)
    guided = peer_guidance(key).guided(peer_inputs()["t"], peer_inputs()["drop"])
    assert guided.tolist() == case["consensus"]["guided_mask"]


@pytest.mark.parametrize("key", GUIDED_CASES)
def test_guiding_every_sample_is_one_option_away(key):
    # The behaviour before the peers' semantics: every sample guided with its own label.
    case = peer_data()["cases"][key]
    old = MeanFlowGuidance(
        case["omega"], case["kappa"], uncond={"y": 3}, label_dropout=0.0, eval_mode=False
    )
    loss, u_tgt, v_tilde = _run(old, case, None)
    ref = case["guide_every_sample"]
    torch.testing.assert_close(loss, torch.tensor(ref["loss"], dtype=F64), **TOL)
    torch.testing.assert_close(u_tgt, torch.tensor(ref["u_tgt"], dtype=F64), **TOL)
    torch.testing.assert_close(v_tilde, torch.tensor(ref["v_tilde"], dtype=F64), **TOL)
    consensus = torch.tensor(case["consensus"]["v_tilde"], dtype=F64)
    assert (v_tilde - consensus).abs().max() > 0.1  # the peers' semantics do change v_tilde


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    omega=st.floats(0.1, 4.0),
    kappa=st.floats(0.0, 0.9),
    window=st.tuples(st.sampled_from([0.0, 0.2, 0.5]), st.sampled_from([0.5, 0.75, 1.0])),
    p=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_guided_loss_is_eqs_10_21_22(seed, omega, kappa, window, p):
    # Random tiny nets and batches against the equations written out with du/dt in closed
    # form; the times include the window's edges, which are inside it.
    gen = torch.Generator().manual_seed(seed)
    shapes = {"W1": (3, 6), "wt": (6,), "wh": (6,), "E": (4, 6), "b1": (6,), "W2": (6, 3)}
    weights = {k: torch.randn(s, generator=gen, dtype=F64) for k, s in shapes.items()}
    student = TinyStudent({**weights, "b2": torch.randn(3, generator=gen, dtype=F64)})
    x, eps = torch.randn(2, 12, 3, generator=gen, dtype=F64)
    grid = torch.tensor([0.0, 0.2, 0.5, 0.75, 1.0, 0.3, 0.9, 0.6], dtype=F64)
    t = grid[torch.randint(0, 8, (12,), generator=gen)]
    r = t * torch.rand(12, generator=gen, dtype=F64) * (torch.rand(12, generator=gen) < 0.5)
    y, drop = torch.randint(0, 3, (12,), generator=gen), torch.rand(12, generator=gen) < 0.3
    g = MeanFlowGuidance(
        omega, kappa, uncond={"y": 3}, t_min=window[0], t_max=window[1], label_dropout=0.1
    )
    loss_fn = MeanFlowLoss(weighting=AdaptiveWeight(p, 1e-2), guidance=g)
    loss, _ = loss_fn(student, x, noise=eps, cond={"y": y}, r=r, t=t, cond_drop=drop)
    guided = (t >= window[0]) & (t <= window[1]) & ~drop
    y_student = torch.where(drop, 3, y)
    ref, _, _ = reference_loss(
        student, x, eps, r, t, y_student, p=p, c=1e-2, omega=omega, kappa=kappa, guided=guided
    )
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    omega=st.floats(0.1, 4.0),
    kappa=st.floats(0.0, 0.9),
    t_min=st.sampled_from([0.0, 0.25, 0.5]),
    t_max=st.sampled_from([0.5, 0.75, 1.0]),
)
def test_outside_the_window_and_on_dropped_rows_v_passes_through_exactly(
    seed, omega, kappa, t_min, t_max
):
    gen = torch.Generator().manual_seed(seed)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 0.1, 0.6, 0.9])[torch.randperm(8, generator=gen)]
    z, v = torch.randn(2, 8, 3, generator=gen)
    drop = torch.rand(8, generator=gen) < 0.3

    def student(z, r, t, y):
        return torch.sin(z) * y[:, None] + t[:, None]

    g = MeanFlowGuidance(
        omega, kappa, uncond={"y": torch.zeros(8)}, t_min=t_min, t_max=t_max, label_dropout=0.1
    )
    y = torch.full((8,), 2.0)
    out = g(v, student, z, t, {"y": y}, drop=drop)
    guided = (t >= t_min) & (t <= t_max) & ~drop
    assert torch.equal(out[~guided], v[~guided])
    mix = omega * v + kappa * student(z, t, t, y) + (1 - omega - kappa) * student(z, t, t, 0 * y)
    torch.testing.assert_close(out[guided], mix[guided])
    assert torch.equal(g.guided(t, drop), guided)


class _Recorder(nn.Module):
    """``u = z * y`` through a dropout, recording each call's training flag and labels."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.frozen = nn.Linear(1, 1)
        self.calls: list[tuple[bool, Tensor]] = []

    def forward(self, z, r, t, y):
        self.calls.append((self.training, y.clone()))
        return self.drop(z) * y[:, None] + (t - r)[:, None]


@pytest.mark.parametrize("eval_mode", [True, False])
def test_guidance_passes_run_with_dropout_off_and_modes_come_back(eval_mode):
    student = _Recorder().train()
    student.frozen.eval()  # a submodule the user keeps in eval stays in eval
    g = MeanFlowGuidance(2.0, 0.5, uncond={"y": 0}, label_dropout=0.1, eval_mode=eval_mode)
    z, t, y = torch.ones(64, 2), torch.rand(64), torch.full((64,), 2.0)
    out = g(z, student, z, t, {"y": y})
    assert [mode for mode, _ in student.calls] == [not eval_mode] * 2
    if eval_mode:  # no dropout: 2 v + 0.5 (2 z) + (-1.5) (0 z) exactly
        torch.testing.assert_close(out, 3.0 * z)
    assert student.training and student.drop.training and not student.frozen.training


def test_dropped_samples_train_unguided_on_the_null_condition():
    # The teacher and the student's loss pass both see the null label on the dropped rows;
    # the guidance passes see the real labels (and the null one).
    student, seen = _Recorder(), []

    def teacher(z, t, y):
        seen.append(y.clone())
        return z * y[:, None]

    y, drop = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([True, False, True, False])
    g = MeanFlowGuidance(2.0, 0.5, uncond={"y": -1.0}, label_dropout=0.1)
    loss_fn = MeanFlowLoss(target=DifferentialTarget("fd"), guidance=g)
    _, metrics = loss_fn(student, torch.randn(4, 2), teacher=teacher, cond={"y": y}, cond_drop=drop)
    nulled = torch.tensor([-1.0, 2.0, -1.0, 4.0])
    assert torch.equal(seen[0], nulled)
    labels = [calls for _, calls in student.calls]
    assert torch.equal(labels[0], y) and torch.equal(labels[1], torch.full((4,), -1.0))
    assert all(torch.equal(later, nulled) for later in labels[2:])
    assert metrics["frac_dropped"] == 0.5 and metrics["frac_guided"] == 0.5


def test_the_loss_draws_the_drop_mask_from_its_generator():
    student, d = peer_student(), peer_inputs()
    g = peer_guidance("w1.0_k0.5/l2")
    loss_fn = MeanFlowLoss(weighting=AdaptiveWeight(p=0.0), guidance=g)
    kw = {"noise": d["eps"], "cond": {"y": d["y"]}, "r": d["r"], "t": d["t"]}
    for seed in range(5):
        drawn, _ = loss_fn(student, d["x"], generator=torch.Generator().manual_seed(seed), **kw)
        drop = torch.rand(8, generator=torch.Generator().manual_seed(seed)) < 0.1
        given_, _ = loss_fn(student, d["x"], cond_drop=drop, **kw)
        assert torch.equal(drawn, given_)


def test_draw_drop_is_bernoulli_and_zero_draws_nothing():
    g = MeanFlowGuidance(1.0, uncond={"y": 0}, label_dropout=0.1)
    gen = torch.Generator().manual_seed(0)
    drop = g.draw_drop(20_000, device=torch.device("cpu"), generator=gen)
    assert drop.dtype == torch.bool and drop.shape == (20_000,)
    assert abs(drop.double().mean().item() - 0.1) < 4 * (0.09 / 20_000) ** 0.5
    off = MeanFlowGuidance(1.0, uncond={"y": 0}, label_dropout=0.0)
    state = gen.get_state()
    assert off.draw_drop(8, device=torch.device("cpu"), generator=gen) is None
    assert torch.equal(gen.get_state(), state)


def test_condition_replaces_the_dropped_rows():
    drop = torch.tensor([True, False, True])
    cond = {"y": torch.tensor([5, 6, 7]), "emb": torch.ones(3, 2, 4), "scale": 2.0}
    g = MeanFlowGuidance(1.0, uncond={"y": 0, "emb": torch.zeros(1, 2, 4)}, label_dropout=0.1)
    out = g.condition(cond, drop)
    assert out["y"].tolist() == [0, 6, 0] and out["y"].dtype == torch.int64
    assert out["emb"].sum((1, 2)).tolist() == [0.0, 8.0, 0.0] and out["scale"] == 2.0
    assert g.condition(cond, None) is cond and cond["y"].tolist() == [5, 6, 7]
    by_call = MeanFlowGuidance(1.0, uncond=lambda c: {**c, "y": 9 - c["y"]}, label_dropout=0.1)
    assert by_call.condition(cond, drop)["y"].tolist() == [4, 6, 2]


def test_the_null_pass_sees_the_null_value_broadcast_to_each_condition():
    cond = {"y": torch.tensor([5, 6, 7]), "emb": torch.ones(3, 2), "flag": False}
    g = MeanFlowGuidance(
        1.0, uncond={"y": 1000, "emb": torch.zeros(2), "flag": True}, label_dropout=0.0
    )
    null = g.null_condition(cond)
    assert null["y"].tolist() == [1000] * 3 and null["y"].dtype == torch.int64
    assert torch.equal(null["emb"], torch.zeros(3, 2)) and null["flag"] is True
    given_ = {"y": torch.tensor(0)}
    assert (
        MeanFlowGuidance(1.0, uncond=lambda c: given_, label_dropout=0.0).null_condition(cond)
        == given_
    )


def test_a_default_label_dropout_warns_that_the_default_changed():
    with pytest.warns(UserWarning, match="label_dropout"):
        g = MeanFlowGuidance(1.0, 0.5, uncond={"y": 0})
    assert g.label_dropout == 0.1 and g.eval_mode and (g.t_min, g.t_max) == (0.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MeanFlowGuidance(1.0, 0.5, uncond={"y": 0}, label_dropout=0.1)
    with pytest.warns(UserWarning, match="every sample"):
        MeanFlowLoss(guidance=lambda v, student, z_t, t, cond: v)


def test_a_plain_callable_still_guides_every_sample():
    seen = []

    def guide(v, student, z_t, t, cond):
        seen.append(torch.is_grad_enabled())
        return 2 * v

    with pytest.warns(UserWarning):
        loss_fn = MeanFlowLoss(weighting=AdaptiveWeight(p=0.0), guidance=guide)
    x, noise, t = torch.randn(4, 2), torch.randn(4, 2), torch.rand(4)
    student = MLPStudent(2)
    loss, _ = loss_fn(student, x, noise=noise, r=t, t=t)
    expected = per_sample_sq_error(student(sample_path(x, noise, t), t, t), 2 * (noise - x))
    torch.testing.assert_close(loss, expected.mean())
    assert seen == [False]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    scale=st.floats(0.0, 12.0),
    eta=st.floats(0.0, 1.0),
    threshold=st.sampled_from([0.0, 0.5, 10.0]),
    shape=st.sampled_from([(3, 4), (2, 3, 4, 4), (1, 5, 2)]),
)
def test_apg_equals_diffusers_normalized_guidance(seed, scale, eta, threshold, shape):
    """Our APG against diffusers' own (the HunyuanImage 2.1 guider's), momentum off; fp32
    inputs, both project in fp64, so they agree to fp32 rounding."""
    from diffusers.guiders.adaptive_projected_guidance_mix import normalized_guidance

    gen = torch.Generator().manual_seed(seed)
    v_c, v_u = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    ours = apg_velocity(v_c, v_u, scale, eta=eta, norm_threshold=threshold)
    theirs = normalized_guidance(v_c, v_u, scale, None, eta, threshold, False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * (1 + scale))
    assert ours.dtype == v_c.dtype


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.0, 12.0))
def test_apg_with_the_whole_direction_is_cfg_and_projects_out_the_rest(seed, scale):
    gen = torch.Generator().manual_seed(seed)
    v_c, v_u = (
        torch.randn(4, 6, generator=gen, dtype=F64),
        torch.randn(4, 6, generator=gen, dtype=F64),
    )
    torch.testing.assert_close(
        apg_velocity(v_c, v_u, scale, eta=1.0),
        cfg_velocity(v_c, v_u, scale),
        rtol=1e-12,
        atol=1e-12,
    )
    # eta = 0: the update is orthogonal to v_c, sample by sample
    update = apg_velocity(v_c, v_u, 1.0) - v_u
    assert (update * v_c).sum(dim=1).abs().max() < 1e-10
    # a threshold caps the update's norm
    capped = apg_velocity(v_c, v_u, 1.0, eta=1.0, norm_threshold=0.1) - v_u
    assert capped.norm(dim=1).max() <= 0.1 + 1e-12


def test_apg_refuses_bad_input_by_name():
    v = torch.randn(2, 3)
    with pytest.raises(ValueError, match="v_uncond"):
        apg_velocity(v, torch.randn(2, 4), 2.0)
    with pytest.raises(ValueError, match="eta"):
        apg_velocity(v, v, 2.0, eta=-1.0)
    with pytest.raises(ValueError, match="norm_threshold"):
        apg_velocity(v, v, 2.0, norm_threshold=float("nan"))
