"""``r_embedding="native"``: a HunyuanImage 2.1 student in diffusers' own ``use_meanflow`` form,
which ``mfcore-distill export`` writes as a stock transformer that the stock
``HunyuanImagePipeline`` runs, equal to ``mfcore-distill generate`` from the same noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import HunyuanImagePipeline, HunyuanImageTransformer2DModel
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from mfcore.adapters.distill_cli import main
from mfcore.adapters.family import Synthetic
from mfcore.adapters.generation import seeded_noise
from mfcore.adapters.hunyuanimage2 import (
    FAMILY,
    HunyuanImage2NativeStudent,
    HunyuanImage2Student,
)
from mfcore.adapters.lora import LoraSpec, add_lora, lora_active, merged_state_dict
from mfcore.adapters.pipeline import MeanFlowPipeline
from mfcore.adapters.student import load_student
from tests._cli import usage_error
from tests._close import FP32, assert_close_to, max_rel
from tests._pipelines import hy21_ckpt

__all__ = ["hy21_ckpt"]  # the fixture this module uses


def _inputs(dtype=torch.float64):
    data = FAMILY.synthetic_sample(
        Synthetic(2, 4, 4, 5, torch.Generator().manual_seed(0), False, FAMILY.tiny_dims)
    )
    z = data.pop("latents").to(dtype)
    cond = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in data.items()}
    return z, torch.tensor([0.7, 0.4], dtype=dtype), cond


def _perturb(student, scale=0.05):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def test_the_native_student_starts_at_the_teacher_at_r_equal_t_only():
    """e_r a copy of e: (e(t) + e_r(t)) / 2 = e(t) exactly, so u(z, t, t) is the teacher bit
    for bit; for r < t the mean embedding moves it. The teacher (no timestep_r, LoRA off)
    stays the base model after the student's weights change; e_r and the LoRA are trained."""
    base = FAMILY.tiny_model(0, torch.float64, False)
    student = HunyuanImage2NativeStudent(FAMILY.tiny_model(0, torch.float64, False),
                                         lora=LoraSpec(rank=2))  # fmt: skip
    assert student.transformer.config.use_meanflow
    teacher = student.teacher()
    z, t, cond = _inputs()
    with torch.no_grad():
        v = teacher(z, t, **cond)
        assert torch.equal(v, HunyuanImage2Student(base).teacher()(z, t, **cond))
        assert torch.equal(student(z, t, t, **cond), v)
        assert max_rel(student(z, 0.5 * t, t, **cond), v) > 1e-3
        _perturb(student)
        assert torch.equal(teacher(z, t, **cond), v)
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    assert any("timestep_embedder_r" in n for n in trained)
    assert all("timestep_embedder_r" in n or ".lora_" in n for n in trained)


_NATIVE = HunyuanImage2NativeStudent(FAMILY.tiny_model(0, torch.float64, False),
                                     lora=LoraSpec(rank=2))  # fmt: skip


@settings(max_examples=25, deadline=None)
@given(t=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2), seed=st.integers(0, 2**16))
def test_at_init_the_native_student_is_the_teacher_at_r_equal_t_for_any_t(t, seed):
    """``(e(t) + e_r(t)) / 2 = e(t)`` exactly when ``e_r`` is a copy of ``e`` (a sum of a
    float with itself is exact, and so is halving it): bit for bit, at any ``t``."""
    z, _, cond = _inputs()
    z = z + torch.randn(z.shape, generator=torch.Generator().manual_seed(seed), dtype=z.dtype)
    times = torch.tensor(t, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(_NATIVE(z, times, times, **cond), _NATIVE.teacher()(z, times, **cond))


def test_a_half_precision_base_keeps_e_r_in_fp32():
    """On a bf16 base e_r is trained in fp32 (as the LoRA) and runs inside the bf16 model."""
    student = HunyuanImage2NativeStudent(FAMILY.tiny_model(0, torch.bfloat16, False),
                                         lora=LoraSpec(rank=2))  # fmt: skip
    assert {p.dtype for p in student.interval.parameters()} == {torch.float32}
    z, t, cond = _inputs(torch.bfloat16)
    u = student(z, 0.5 * t, t, **cond)
    assert u.dtype == torch.bfloat16 and torch.isfinite(u).all()


def test_save_and_load_keep_the_form(tmp_path):
    """load_student builds the native student from its folder; an interval student refuses
    to load it (and the other way round), by name."""
    student = HunyuanImage2NativeStudent(FAMILY.tiny_model(0, torch.float64, False),
                                         lora=LoraSpec(rank=2))  # fmt: skip
    _perturb(student)
    student.save_pretrained(tmp_path / "native")
    assert (tmp_path / "native" / "timestep_embedder_r.safetensors").is_file()
    again = load_student(FAMILY.tiny_model(0, torch.float64, False), tmp_path / "native", FAMILY)
    assert isinstance(again, HunyuanImage2NativeStudent)
    z, t, cond = _inputs()
    with torch.no_grad():
        assert torch.equal(again(z, 0.5 * t, t, **cond), student(z, 0.5 * t, t, **cond))
    interval = HunyuanImage2Student(FAMILY.tiny_model(0, torch.float64, False),
                                    lora=LoraSpec(rank=2))  # fmt: skip
    with pytest.raises(ValueError, match="r_embedding 'native'"):
        interval.load_pretrained(tmp_path / "native")
    interval.save_pretrained(tmp_path / "interval")
    with pytest.raises(ValueError, match="r_embedding 'interval'"):
        again.load_pretrained(tmp_path / "interval")
    with pytest.raises(ValueError, match="use_meanflow"):  # Tencent's distilled release
        HunyuanImage2NativeStudent(HunyuanImageTransformer2DModel(
            **FAMILY.config_summary(FAMILY.tiny_model(0, torch.float32, False))
            | {"use_meanflow": True}))  # fmt: skip


def test_merged_state_dict_is_the_lora_model():
    """The merged weights under the base names load into a fresh model that computes what
    the model with its LoRA computes; another adapter is left out, the model unchanged."""
    tr = FAMILY.tiny_model(0, torch.float64, False)
    names = set(tr.state_dict())
    add_lora(tr, LoraSpec(rank=2, target_modules=("transformer_blocks.0.attn.to_q",)),
             adapter_name="a")  # fmt: skip
    add_lora(tr, LoraSpec(rank=2, target_modules=("transformer_blocks.0.attn.to_k",)),
             adapter_name="b")  # fmt: skip
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if ".lora_B." in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    before = {k: v.clone() for k, v in tr.state_dict().items()}
    merged = merged_state_dict(tr, adapter_name="a")
    assert set(merged) == names
    assert all(torch.equal(v, tr.state_dict()[k]) for k, v in before.items())
    fresh = FAMILY.tiny_model(1, torch.float64, False)
    fresh.load_state_dict(merged)
    z, t, cond = _inputs()
    call = FAMILY.call_inputs(tr, z, cond, 3.5, False)
    with torch.no_grad(), lora_active(tr, "a"):
        expected = FAMILY.velocity(tr, z, t, call.inputs)
    with torch.no_grad():
        got = FAMILY.velocity(fresh, z, t, call.inputs)
    assert_close_to(got, expected, FP32, "merged")
    with pytest.raises(ValueError, match="no LoRA adapter named 'c'"):
        merged_state_dict(tr, adapter_name="c")


@settings(max_examples=25, deadline=None)
@given(
    rank=st.integers(1, 4),
    alpha=st.floats(0.25, 16.0),
    seed=st.integers(0, 2**16),
    other=st.booleans(),
)
def test_merging_is_the_lora_forward(rank, alpha, seed, other):
    """For any rank, alpha and weights, W + (alpha / rank) B A under the base name computes
    what the layer with its adapter computes (fp64), and another adapter is left out."""
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.SiLU(), torch.nn.Linear(5, 3))
    model = model.double()
    add_lora(model, LoraSpec(rank=rank, alpha=alpha, target_modules=("0", "2")), adapter_name="a")
    if other:
        add_lora(model, LoraSpec(rank=2, target_modules=("0",)), adapter_name="b")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    with torch.no_grad(), lora_active(model, "a"):
        expected = model(x)
    plain = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.SiLU(), torch.nn.Linear(5, 3))
    plain = plain.double()
    plain.load_state_dict(merged_state_dict(model, adapter_name="a"))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, rtol=1e-12, atol=1e-12)  # fp64


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_the_stock_pipeline_runs_the_exported_student(tmp_path, hy21_ckpt, steps, capsys):
    """export writes a stock transformer; diffusers' own HunyuanImagePipeline (prompt
    encoding, its shifted grid, timestep_r = the next grid time, its VAE) makes the images
    that generate and MeanFlowPipeline make from the same prompt and noise."""
    path, _ = hy21_ckpt
    transformer, _ = FAMILY.load_model(str(path), torch.float32)
    student = HunyuanImage2NativeStudent(transformer, lora=LoraSpec(rank=2))
    _perturb(student)
    folder, stock = tmp_path / "student", tmp_path / "stock"
    student.save_pretrained(folder)
    assert main(["export", "--model", str(path), "--student", str(folder), "--output",
                 str(stock), "--dtype", "fp32"]) == 0  # fmt: skip
    assert "HunyuanImagePipeline" in capsys.readouterr().out
    assert "guider=None" in (stock / "README.md").read_text()
    prompts = ['a shop sign that says "open"', "two birds"]
    out = tmp_path / "images"
    assert main(["generate", "--model", str(path), "--student", str(folder), "--prompt",
                 prompts[0], "--prompt", prompts[1], "--steps", str(steps), "--seed", "5",
                 "--height", "32", "--width", "32", "--dtype", "fp32", "--output",
                 str(out)]) == 0  # fmt: skip
    ours = load_file(str(out / "latents.safetensors"))[f"{steps}step"]

    pipe = HunyuanImagePipeline.from_pretrained(
        path, transformer=HunyuanImageTransformer2DModel.from_pretrained(stock),
        guider=None, ocr_guider=None,
    )  # fmt: skip
    assert pipe.transformer.config.use_meanflow
    noise = seeded_noise(tuple(ours.shape), 5, "cpu", torch.float32)
    kwargs = dict(num_inference_steps=steps, height=32, width=32, latents=noise)
    with torch.no_grad():
        latents = pipe(prompts, output_type="latent", **kwargs).images
        images = pipe(prompts, output_type="np", **kwargs).images
    assert_close_to(latents, ours, FP32, f"{steps} steps")
    mf = MeanFlowPipeline.from_pretrained(path, student=folder, torch_dtype=torch.float32)
    result = mf(prompts, num_inference_steps=steps, height=32, width=32, seed=5,
                output_type="np")  # fmt: skip
    np.testing.assert_allclose(result.images, images, atol=1e-4)


def test_export_and_train_refuse_what_has_no_stock_form(tmp_path, hy21_ckpt, capsys):
    """An interval student has no stock form, and a family without a native r input cannot
    train in it: both usage errors that say why."""
    path, _ = hy21_ckpt
    transformer, _ = FAMILY.load_model(str(path), torch.float32)
    HunyuanImage2Student(transformer, lora=LoraSpec(rank=2)).save_pretrained(tmp_path / "s")
    err = usage_error(["export", "--model", str(path), "--student", str(tmp_path / "s"),
                       "--output", str(tmp_path / "o")], capsys)  # fmt: skip
    assert "interval embedding" in err and "--r-embedding native" in err
    data = tmp_path / "data"
    assert main(["make-data", str(data), "--family", "flux"]) == 0
    err = usage_error(["train", "--tiny", "--data", str(data), "--output", str(tmp_path / "r"),
                       "--r-embedding", "native", "--device", "cpu"], capsys)  # fmt: skip
    assert "FLUX" in err and "HunyuanImage 2.1 only" in err
    assert "invalid choice" in usage_error(
        ["train", "--tiny", "--data", str(data), "--output", "x", "--r-embedding", "mean"], capsys
    )
