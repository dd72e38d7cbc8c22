"""ArcFlow head on a tiny random FluxTransformer2DModel (diffusers' test config), float64."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from hypothesis import given, settings
from hypothesis import strategies as st

from mfcore.adapters.flux import (
    FLUX_DEV_CONFIG,
    FLUX_LORA_TARGETS,
    TINY_FLUX_CONFIG,
    FluxStudent,
    FluxTeacher,
)
from mfcore.adapters.flux_arcflow import FluxArcFlowStudent, arcflow_lora_targets
from mfcore.adapters.lora import LoraSpec
from mfcore.arcflow import (
    ArcFlowDistillationLoss,
    ArcFlowStudent,
    TeacherMixSchedule,
    arc_step,
    arc_velocity,
    sample_arcflow,
)

F64 = torch.float64
SETTINGS = settings(max_examples=6, deadline=None)


def tiny(guidance: bool = False, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**dict(TINY_FLUX_CONFIG, guidance_embeds=guidance)).to(F64)


def batch(b: int = 3, h: int = 4, w: int = 6, seq: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 1, h, w, generator=g, dtype=F64)
    s0 = 0.05 + 0.95 * torch.rand(b, generator=g, dtype=F64)
    s1 = s0 * torch.rand(b, generator=g, dtype=F64)
    cond = {
        "prompt_embeds": torch.randn(b, seq, 32, generator=g, dtype=F64),
        "pooled_prompt_embeds": torch.randn(b, 32, generator=g, dtype=F64),
    }
    return z, s0, s1, cond


def perturb(student: FluxArcFlowStudent, scale: float = 0.1, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def unpack_by_hand(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, L, 4C) -> (B, C, H, W), written independently of the adapter's helpers."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def bc(t: torch.Tensor) -> torch.Tensor:
    return t[:, None, None, None]


# --------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("guidance", [False, True])
@SETTINGS
@given(k=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_init_step_is_the_teachers_euler_step(guidance, k, seed):
    student = FluxArcFlowStudent(tiny(guidance), num_components=k, guidance_scale=2.5)
    z, s0, s1, cond = batch(seed=seed)
    params = student(z, s0, **cond)
    v = student.teacher()(z, s0, **cond)
    torch.testing.assert_close(arc_step(params, z, s0, s1), z - bc(s0 - s1) * v)
    # the mixture is constant in time at init: v(s) = v_teacher(z, s0) for every s <= s0
    torch.testing.assert_close(arc_velocity(params, s1), v)


def test_init_two_step_sampling_equals_two_teacher_euler_steps():
    student = FluxArcFlowStudent(tiny(), num_components=2)
    z, _, _, cond = batch(b=2)
    grid = torch.tensor([1.0, 0.6, 0.0], dtype=F64)
    got = sample_arcflow(student, z, grid=grid, cond=cond)
    teacher, want = student.teacher(), z
    for a, b in zip(grid[:-1], grid[1:], strict=True):
        want = want - (a - b) * teacher(want, a.expand(2).clone(), **cond)
    torch.testing.assert_close(got, want)


def test_teacher_is_the_untouched_base_model_after_perturbation():
    pristine = tiny(seed=3)
    student = FluxArcFlowStudent(tiny(seed=3), num_components=3, lora=LoraSpec(rank=2))
    perturb(student)
    z, s0, _, cond = batch()
    want = FluxTeacher(pristine)(z, s0, **cond)
    torch.testing.assert_close(student.teacher()(z, s0, **cond), want, rtol=1e-12, atol=1e-12)
    # ... while the perturbed student no longer is the teacher
    assert not torch.allclose(arc_velocity(student(z, s0, **cond), s0), want, atol=1e-6)


# --------------------------------------------------------------------------- layout and shapes


@pytest.mark.parametrize("k", [1, 3])
def test_shapes_constraints_and_protocol(k):
    student = FluxArcFlowStudent(tiny(), num_components=k, max_rate=4.0, lora=LoraSpec(rank=2))
    perturb(student, scale=0.5)
    assert isinstance(student, ArcFlowStudent) and student.num_components == k
    z, s0, _, cond = batch(b=2, h=6, w=4)
    p = student(z, s0, **cond)
    assert p.m.shape == (2, k, 1, 6, 4) and p.m.dtype == F64
    assert p.weights.shape == p.rates.shape == (2, k, 1, 6, 4)
    assert torch.equal(p.s0, s0)
    torch.testing.assert_close(p.weights.sum(1), torch.ones(2, 1, 6, 4, dtype=F64))
    assert bool((p.rates[:, 0] == 0).all()) and bool((p.rates <= 4.0).all())
    # weights and rates are per token: constant over each 2x2 latent patch
    for x in (p.weights, p.rates):
        patches = x.reshape(2, k, 1, 3, 2, 2, 2)
        assert torch.equal(patches, patches[:, :, :, :, :1, :, :1].expand_as(patches))


def test_components_are_the_head_on_the_final_features_unpacked():
    """Recompute the head by hand from the features entering proj_out (independent unpacking)."""
    k = 2
    student = FluxArcFlowStudent(tiny(), num_components=k, lora=LoraSpec(rank=2))
    perturb(student, scale=0.3)
    z, s0, _, cond = batch(b=2)
    seen = []
    hook = student.transformer.norm_out.register_forward_hook(lambda m, a, out: seen.append(out))
    p = student(z, s0, **cond)
    hook.remove()
    raw = student.head.proj(seen[0])  # (B, L, K (4C + 2)), C = 1
    for j in range(k):
        torch.testing.assert_close(p.m[:, j], unpack_by_hand(raw[..., 4 * j : 4 * j + 4], 4, 6))
    logits = raw[..., 4 * k : 5 * k]
    pi = unpack_by_hand(torch.softmax(logits, -1)[..., None, :].expand(-1, -1, 4, -1)[..., 0], 4, 6)
    torch.testing.assert_close(p.weights[:, 0], pi)


def test_sampling_runs_with_the_student_and_keeps_shape():
    student = FluxArcFlowStudent(tiny(guidance=True), num_components=2, lora=LoraSpec(rank=2))
    perturb(student)
    z, _, _, cond = batch(b=2)
    out, traj = sample_arcflow(student, z, 2, cond=cond, return_trajectory=True, substeps=2)
    assert out.shape == z.shape and traj.shape == (5, *z.shape)
    assert bool(torch.isfinite(traj).all())


# --------------------------------------------------------------------------- training


def test_one_training_step_changes_only_trainable_parameters():
    student = FluxArcFlowStudent(tiny(), num_components=2, lora=LoraSpec(rank=2))
    teacher = student.teacher()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert any(n.startswith("head.") for n in trainable)
    assert any(".lora_B." in n for n in trainable)
    z, _, _, cond = batch(b=2, seed=4)
    loss_fn = ArcFlowDistillationLoss(steps=2, mix_schedule=TeacherMixSchedule(start=0.5))
    opt = torch.optim.Adam(student.trainable_parameters(), lr=1e-2)
    loss, metrics = loss_fn(
        student, teacher, z, cond=cond, generator=torch.Generator().manual_seed(0)
    )
    assert loss.ndim == 0 and bool(torch.isfinite(loss)) and loss.item() > 0
    assert set(metrics) >= {"loss", "velocity_mse", "rate_mean", "teacher_fraction"}
    opt.zero_grad()
    loss.backward()
    opt.step()
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any(n.startswith("head.") for n in changed)
    assert any(".lora_B." in n for n in changed)
    # the teacher (shared base weights) did not move
    z2, s0, _, _ = batch(b=2, seed=4)
    torch.testing.assert_close(teacher(z2, s0, **cond), FluxTeacher(tiny())(z2, s0, **cond))


def test_trainable_state_round_trip():
    a = FluxArcFlowStudent(tiny(), num_components=3, lora=LoraSpec(rank=2))
    perturb(a)
    state = a.trainable_state_dict()
    assert all(k.startswith(("lora.", "head.")) for k in state)
    b = FluxArcFlowStudent(tiny(), num_components=3, lora=LoraSpec(rank=2))
    b.load_trainable_state_dict(state)
    z, s0, _, cond = batch()
    pa, pb = a(z, s0, **cond), b(z, s0, **cond)
    for f in ("m", "weights", "rates"):
        assert torch.equal(getattr(pa, f), getattr(pb, f))
    with pytest.raises(ValueError, match="unexpected"):
        b.load_trainable_state_dict({**state, "other.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="head state"):
        b.load_trainable_state_dict({k: v for k, v in state.items() if k != "head.proj.bias"})
    c = FluxArcFlowStudent(tiny(), num_components=2, lora=LoraSpec(rank=2))
    with pytest.raises(ValueError, match="shape"):
        c.load_trainable_state_dict(state)


def test_flux_dev_trainable_fraction_on_meta():
    with torch.device("meta"):
        student = FluxArcFlowStudent(FluxTransformer2DModel(**FLUX_DEV_CONFIG), num_components=2)
    trainable, total = student.parameter_counts()
    assert 11.5e9 < total - trainable < 12.5e9  # FLUX.1-dev has ~11.9B parameters
    assert 0 < trainable / total < 0.05
    head = sum(p.numel() for p in student.head.parameters())
    assert head == (3072 + 1) * 2 * (64 + 2)  # inner_dim -> K (4C + 2)


# ------------------------------------------------------------------ LoRA targets and errors


def test_lora_targets_skip_only_the_final_projection():
    tr = tiny()
    targets = arcflow_lora_targets(tr)
    assert "proj_out" not in targets
    assert "single_transformer_blocks.0.proj_out" in targets
    assert set(FLUX_LORA_TARGETS) - {"proj_out"} <= set(targets)
    student = FluxArcFlowStudent(tr)
    lora_modules = {n.rsplit(".lora_", 1)[0] for n, _ in tr.named_parameters() if ".lora_" in n}
    assert "single_transformer_blocks.0.proj_out" in lora_modules
    assert not any(n == "proj_out" for n in lora_modules)
    assert type(student.transformer.proj_out) is torch.nn.Linear
    # LoraSpec's default targets name the bare "proj_out": narrowed the same way
    narrowed = FluxArcFlowStudent(tiny(), lora=LoraSpec(rank=2, target_modules=FLUX_LORA_TARGETS))
    assert set(narrowed.lora_spec.target_modules) == set(targets)
    assert narrowed.lora_spec.rank == 2


def test_errors():
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        FluxArcFlowStudent(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="lora"):
        FluxArcFlowStudent(tiny(), lora={"rank": 2})
    with pytest.raises(ValueError, match="num_components"):
        FluxArcFlowStudent(tiny(), num_components=0)
    with pytest.raises(ValueError, match="max_rate"):
        FluxArcFlowStudent(tiny(), max_rate=1e3)
    tr = tiny()
    FluxStudent(tr, lora=LoraSpec(rank=2))  # wraps proj_out with LoRA
    with pytest.raises(TypeError, match="proj_out"):
        FluxArcFlowStudent(tr)
    student = FluxArcFlowStudent(tiny(), lora=LoraSpec(rank=2))
    z, s0, _, cond = batch()
    with pytest.raises(ValueError, match="z"):
        student(z[:, :, :3], s0, **cond)
    with pytest.raises(ValueError, match="s0"):
        student(z, s0[:2], **cond)
    with pytest.raises(ValueError, match="s0"):
        student(z, s0 + 1.0, **cond)
    with pytest.raises(ValueError, match="prompt_embeds"):
        student(
            z,
            s0,
            prompt_embeds=cond["prompt_embeds"][:2],
            pooled_prompt_embeds=cond["pooled_prompt_embeds"],
        )
    with pytest.raises(ValueError, match="guidance"):
        student(z, s0, guidance=3.0, **cond)
