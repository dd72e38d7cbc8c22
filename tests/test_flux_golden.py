"""FLUX after the move onto the adapter core reproduces the FLUX adapter before it.

``tests/data/flux_golden.safetensors`` was written by ``tests/data/make_flux_golden.py`` on
the FLUX code before the adapter core existed (commit c9a6143); every output here is
recomputed by today's code from the same seeds. They were stored on one machine, so they
agree to fp32 rounding, not bit for bit (``tests/_close.py`` says why): a tolerance of 1e-4 of
each output's scale, while a changed formula moves them by far more.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from mfcore.adapters.flux import FluxStudent, FluxTeacher
from mfcore.adapters.flux_arcflow import FluxArcFlowStudent
from mfcore.adapters.generation import generate_latents
from mfcore.adapters.lora import LoraSpec
from mfcore.jvp import total_derivative
from tests._close import FP32, assert_close_to, flat
from tests.data.make_flux_golden import distill_config
from tests.test_flux import batch, perturb, tiny

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "flux_golden.safetensors")


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN)


@pytest.mark.parametrize("guidance", [False, True])
def test_teacher_student_and_dudt_are_unchanged(golden, guidance):
    tag = "g" if guidance else "n"
    z, r, t, cond = batch()
    teacher = FluxTeacher(tiny(guidance), guidance_scale=2.5)
    assert_close_to(teacher(z, t, **cond), golden[f"teacher_{tag}"], FP32, "teacher")
    student = FluxStudent(tiny(guidance), lora=LoraSpec(rank=4, alpha=8.0))
    perturb(student)
    assert_close_to(student(z, r, t, **cond).detach(), golden[f"student_{tag}"], FP32, "u")
    assert_close_to(student(z, t, t, **cond).detach(), golden[f"student_rt_{tag}"], FP32, "u(t,t)")
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(4), dtype=z.dtype)
    t2, r2 = 0.2 + 0.6 * t, 0.1 + 0.3 * t
    dudt = total_derivative(student, z, r2, t2, v, method="func", cond=cond)[1]
    assert_close_to(dudt, golden[f"dudt_{tag}"], FP32, "du/dt")


def test_true_cfg_teacher_is_unchanged(golden):
    z, _, t, cond = batch()
    _, _, _, neg = batch(seed=5, seq=3)
    negs = {"negative_" + k: v for k, v in neg.items()}
    v = FluxTeacher(tiny(False), true_cfg_scale=4.0)(z, t, **cond, **negs)
    assert_close_to(v, golden["teacher_cfg"], FP32, "true CFG")


def test_generation_and_arcflow_are_unchanged(golden):
    student = FluxStudent(tiny(True, dtype=torch.float32), lora=LoraSpec(rank=2))
    perturb(student)
    _, _, _, c32 = batch(b=2, dtype=torch.float32)
    for steps in (1, 2, 4):
        z0 = generate_latents(student, c32, height=4, width=6, steps=steps, seed=11)
        assert_close_to(z0, golden[f"generate_{steps}"], FP32, f"{steps} steps")
    z, _, t, cond = batch()
    arc = FluxArcFlowStudent(tiny(True), num_components=2, guidance_scale=2.5)
    perturb(arc)
    params = arc(z, t, **cond)
    assert_close_to(params.m, golden["arc_m"], FP32, "m")
    assert_close_to(params.weights, golden["arc_weights"], FP32, "weights")
    assert_close_to(params.rates, golden["arc_rates"], FP32, "rates")


def test_distillation_run_is_unchanged(tmp_path, golden):
    from mfcore.adapters.flux_distill import distill, make_synthetic_data

    data, run = str(tmp_path / "data"), str(tmp_path / "run")
    make_synthetic_data(data, num_files=2, per_file=3, height=4, width=4, seq_len=4)
    # the recipe the golden was written with: no grid pairs (the default since the recipe issue)
    cfg = distill_config(
        data, run, align="fake", critic_lead=1, critic_rank=2, ema=False, grid_fraction=0.0
    )
    student = distill(cfg)
    state = student.trainable_state_dict()
    expected = {k[len("distill.") :]: v for k, v in golden.items() if k.startswith("distill.")}
    assert state.keys() == expected.keys()
    assert_close_to(flat(state, expected), flat(expected, expected), FP32, "trained state")
    with open(os.path.join(run, "metrics.jsonl")) as f:
        losses = [float(line.split('"loss": ')[1].split(",")[0]) for line in f]
    assert_close_to(torch.tensor(losses, dtype=torch.float64), golden["distill_losses"], FP32)
