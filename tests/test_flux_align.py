"""Trajectory alignment for FLUX: the fake velocity as a second adapter on shared weights."""

from __future__ import annotations

import pytest
import torch

from mfcore.adapters._state import load_state, save_state
from mfcore.adapters.flux import FluxStudent
from mfcore.adapters.flux_align import FluxAlignment, FluxFakeVelocity
from mfcore.adapters.lora import LoraSpec, lora_active
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
