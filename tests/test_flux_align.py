"""Trajectory alignment for FLUX: the fake velocity as a second adapter on shared weights."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mfcore.adapters._state import load_state, save_state
from mfcore.adapters.flux import FluxStudent
from mfcore.adapters.flux_align import FluxAlignment, FluxFakeVelocity
from mfcore.adapters.flux_arcflow import FluxArcFlowStudent
from mfcore.adapters.lora import LoraSpec, lora_active
from mfcore.critics import AlignmentLoss, FakeVelocityCritic
from tests.test_flux import batch, perturb, tiny


def setup(seed: int = 0, checkpointing: bool = False, rank: int = 2):
    student = FluxStudent(tiny(True, seed=seed), lora=LoraSpec(rank=rank))
    perturb(student)  # a student that differs from its teacher
    if checkpointing:
        student.transformer.enable_gradient_checkpointing()
    fake = FluxFakeVelocity(student, lora=LoraSpec(rank=3))
    return student, fake


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def test_fake_starts_as_teacher_and_leaves_student_alone():
    student = FluxStudent(tiny(True), lora=LoraSpec(rank=2))
    perturb(student)
    z, r, t, cond = batch()
    u_before = student(z, r, t, **cond)
    trainable_before = [id(p) for p in student.trainable_parameters()]
    fake = FluxFakeVelocity(student, lora=LoraSpec(rank=3))
    teacher = student.teacher()
    assert torch.equal(fake(z, t, **cond), teacher(z, t, **cond))
    assert torch.equal(student(z, r, t, **cond), u_before)
    # the student's parameters and counts ignore the fake's adapter; the fake owns only it
    assert [id(p) for p in student.trainable_parameters()] == trainable_before
    fake_ids = {id(p) for p in fake.parameters()}
    assert fake_ids and not fake_ids & set(trainable_before)
    assert all(p.requires_grad for p in fake.parameters())
    assert all("mfcore_fake" in k and "lora_" in k for k in fake.state_dict())
    # the fake adapter has the asked rank
    assert {p.shape[0] for n, p in fake.lora.items() if "lora_A" in n} == {3}


def test_each_model_uses_its_own_adapter():
    student, fake = setup()
    z, r, t, cond = batch()
    teacher = student.teacher()
    with torch.no_grad():
        for p in fake.parameters():
            p.add_(0.1)
    v_fake, u, v = fake(z, t, **cond), student(z, t, t, **cond), teacher(z, t, **cond)
    assert not torch.allclose(v_fake, v) and not torch.allclose(u, v)
    # the ambient adapter does not leak into another model's call
    with fake.active():
        assert torch.equal(student(z, t, t, **cond), u)
        assert torch.equal(teacher(z, t, **cond), v)
    with lora_active(student.transformer, student.adapter_name):
        assert torch.equal(fake(z, t, **cond), v_fake)


def test_critic_step_trains_only_the_fake():
    student, fake = setup()
    align = FluxAlignment(fake, lr=1e-2, critic_lead=0)
    z, _, _, cond = batch()
    teacher = student.teacher()
    base = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    stud, fk = snapshot(student.trainable_parameters()), snapshot(fake.parameters())
    metrics = align.critic_step(student, teacher, z, cond, step=0)
    assert float(metrics["critic_updates"]) == 1.0 and torch.isfinite(metrics["critic_fm"])
    assert all(torch.equal(a, b) for a, b in zip(stud, student.trainable_parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(fk, fake.parameters(), strict=True))
    for n, p in student.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n


def test_student_loss_reaches_only_the_student():
    student, fake = setup()
    align = FluxAlignment(fake, lr=1e-2, critic_lead=0)
    z, _, _, cond = batch()
    teacher = student.teacher()
    align.critic_step(student, teacher, z, cond, step=0)  # a fake that differs from the teacher
    for p in fake.parameters():
        p.grad = None
    loss, metrics = align.student_loss(student, teacher, z, cond, step=0)
    loss.backward()
    assert float(metrics["align_gap_rms"]) > 0
    assert all(p.grad is None for p in fake.parameters())
    grads = [p.grad for p in student.trainable_parameters()]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_gating_by_start_and_lead():
    student, fake = setup()
    align = FluxAlignment(fake, start=2, critic_lead=3)
    z, _, _, cond = batch()
    teacher = student.teacher()
    fk = snapshot(fake.parameters())
    assert align.critic_step(student, teacher, z, cond, step=1) == {}
    assert all(torch.equal(a, b) for a, b in zip(fk, fake.parameters(), strict=True))
    loss, metrics = align.student_loss(student, teacher, z, cond, step=4)
    assert metrics == {} and float(loss) == 0.0 and not loss.requires_grad
    assert align.critic_step(student, teacher, z, cond, step=2)
    assert align.student_loss(student, teacher, z, cond, step=5)[1]


@pytest.mark.parametrize("critic", ["fake", "meanflow"])
def test_gradient_checkpointing_changes_nothing(critic):
    """Recomputed blocks run with the right adapter: critic and student updates match."""
    results = []
    for checkpointing in (False, True):
        student, fake = setup(checkpointing=checkpointing)
        align = FluxAlignment(fake, critic=critic, lr=1e-2, critic_lead=0, seed=3)
        z, _, _, cond = batch()
        teacher = student.teacher()
        align.critic_step(student, teacher, z, cond, step=0)
        loss, _ = align.student_loss(student, teacher, z, cond, step=0)
        loss.backward()
        results.append(
            (snapshot(fake.parameters()), [p.grad.clone() for p in student.trainable_parameters()])
        )
    (fake_a, grad_a), (fake_b, grad_b) = results
    for a, b in zip(fake_a + grad_a, fake_b + grad_b, strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-9)


def test_state_dict_resumes_exactly(tmp_path):
    student, fake = setup()
    align = FluxAlignment(fake, lr=1e-2, critic_lead=0, critic_updates=2)
    z, _, _, cond = batch()
    teacher = student.teacher()
    align.critic_step(student, teacher, z, cond, step=0)
    save_state(align.state_dict(), tmp_path / "align")  # as a checkpoint does: no pickle
    align.critic_step(student, teacher, z, cond, step=1)
    expected = snapshot(fake.parameters())

    student2, fake2 = setup()
    align2 = FluxAlignment(fake2, lr=1e-2, critic_lead=0, critic_updates=2)
    state = load_state(tmp_path / "align")
    align2.load_state_dict(state)
    align2.critic_step(student2, teacher, z, cond, step=1)
    assert align2.loss.updates_done == 4
    for a, b in zip(expected, fake2.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(KeyError, match="generator"):
        align2.load_state_dict({"loss": state["loss"]})


def test_bad_arguments():
    student, fake = setup()
    with pytest.raises(ValueError, match="already has an adapter"):
        FluxFakeVelocity(student)
    with pytest.raises(TypeError, match="student"):
        FluxFakeVelocity(student.transformer)
    with pytest.raises(TypeError, match="fake"):
        FluxAlignment(student)
    with pytest.raises(ValueError, match="critic"):
        FluxAlignment(fake, critic="kernel")
    with pytest.raises(ValueError, match="weight"):
        FluxAlignment(fake, weight=-1.0)
    with pytest.raises(ValueError, match="critic_lead"):
        FluxAlignment(fake, critic_lead=-1)
    with pytest.raises(ValueError, match="no LoRA adapter named 'other'"):
        with lora_active(student.transformer, "other"):
            pass


@pytest.mark.parametrize("inside", [False, True])
def test_checkpointing_recomputes_with_the_callers_adapter(inside):
    """Equal ranks (the CLI's default), the critic used without FluxAlignment, and a student
    backward run while the fake's adapter is active: recomputed blocks still use the adapter
    of the call that checkpointed them, so nothing changes with checkpointing."""
    results = []
    for checkpointing in (False, True):
        student = FluxStudent(tiny(True), lora=LoraSpec(rank=2))
        perturb(student)
        if checkpointing:
            student.transformer.enable_gradient_checkpointing()
        fake = FluxFakeVelocity(student, lora=LoraSpec(rank=2))
        opt = torch.optim.AdamW(fake.parameters(), lr=1e-2)
        loss = AlignmentLoss(FakeVelocityCritic(fake, opt))
        z, _, _, cond = batch()
        g = torch.Generator().manual_seed(0)
        loss.critic_step(student, torch.randn(z.shape, generator=g, dtype=z.dtype), cond=cond)
        value, _ = loss.student_loss(
            student, torch.randn(z.shape, generator=g, dtype=z.dtype), teacher=student.teacher(),
            cond=cond, generator=g,
        )  # fmt: skip
        with fake.active() if inside else contextlib.nullcontext():
            value.backward()
        results.append(
            snapshot(fake.parameters()) + snapshot(p.grad for p in student.trainable_parameters())
        )
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-9)


def test_half_precision_base_trains_fp32_weights():
    student = FluxStudent(tiny(True, dtype=torch.bfloat16), lora=LoraSpec(rank=2))
    fake = FluxFakeVelocity(student, lora=LoraSpec(rank=2))
    assert {p.dtype for p in student.trainable_parameters()} == {torch.float32}
    assert {p.dtype for p in fake.parameters()} == {torch.float32}
    z, r, t, cond = batch(dtype=torch.float32)
    teacher = student.teacher()
    assert torch.equal(student(z, r, t, **cond), teacher(z, t, **cond))
    assert torch.equal(fake(z, t, **cond), teacher(z, t, **cond))
    before = {n: p.detach().clone() for n, p in fake.lora.items() if "lora_A" in n}
    align = FluxAlignment(fake, lr=1e-4, critic_lead=0, critic_updates=3)
    align.critic_step(student, teacher, z, cond, step=0)
    # A starts random (|A| ~ 0.1): Adam's 1e-4 steps change most of its entries in fp32,
    # while bf16 (8 significant bits) would round most of them away
    for n, a in before.items():
        assert float((fake.lora[n] != a).float().mean()) > 0.5, n


def test_arcflow_student_keeps_its_adapter_beside_a_fake():
    student = FluxArcFlowStudent(tiny(True), num_components=2, lora=LoraSpec(rank=2))
    perturb(student)
    fake = FluxFakeVelocity(student, lora=LoraSpec(rank=2, target_modules=("attn.to_q",)))
    with torch.no_grad():
        for p in fake.parameters():
            p.add_(0.5)
    z, _, t, cond = batch()
    out = student(z, t, **cond)
    with fake.active():
        inside = student(z, t, **cond)
    assert torch.equal(out.m, inside.m) and torch.equal(out.rates, inside.rates)
