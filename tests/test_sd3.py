"""Stable Diffusion 3 on the adapter core: the checks docs/adapters.md asks of a new family, on a
tiny random model and a tiny pipeline built here (no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mfcore.adapters.distill_cli import main
from mfcore.adapters.family import Synthetic, detect_family
from mfcore.adapters.generation import seeded_noise
from mfcore.adapters.lora import LoraSpec, lora_disabled
from mfcore.adapters.pipeline import MeanFlowPipeline
from mfcore.adapters.routing import attention_mode_for
from mfcore.adapters.sd3 import FAMILY, TINY_SD3_CONFIG, SD3Student
from mfcore.adapters.sizes import meta_counts
from mfcore.adapters.student import load_student
from mfcore.jvp import total_derivative
from mfcore.solvers import sample_meanflow, sample_teacher
from tests._close import FP32, assert_close_to, max_rel
from tests._pipelines import sd3_ckpt, tiny_sd3_pipeline

__all__ = ["sd3_ckpt"]  # the fixture this module uses

F64 = torch.float64


def _batch(dtype=F64, negatives=True):
    data = FAMILY.synthetic_sample(
        Synthetic(2, 4, 6, 5, torch.Generator().manual_seed(0), negatives, FAMILY.tiny_dims)
    )
    z = data.pop("latents").to(dtype)
    return z, torch.tensor([0.8, 0.35], dtype=dtype), {k: v.to(dtype) for k, v in data.items()}


def _perturb(student, scale=0.05):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype))


def _direct(model, z, t, pe, pooled):
    """The transformer called as StableDiffusion3Pipeline calls it (timestep = sigma * 1000)."""
    return model(hidden_states=z, timestep=t * 1000, encoder_hidden_states=pe,
                 pooled_projections=pooled, return_dict=False)[0]  # fmt: skip


def test_teacher_is_the_pipelines_call_with_two_pass_cfg():
    student = SD3Student(FAMILY.tiny_model(0, F64, False), lora=LoraSpec(rank=2))
    z, t, cond = _batch()
    model = student.transformer
    with torch.no_grad(), lora_disabled(model):
        pos = _direct(model, z, t, cond["prompt_embeds"], cond["pooled_prompt_embeds"])
        neg = _direct(model, z, t, cond["negative_prompt_embeds"],
                      cond["negative_pooled_prompt_embeds"])  # fmt: skip
        assert torch.equal(student.teacher()(z, t, **cond), pos)
        assert torch.equal(student.teacher(true_cfg_scale=4.0)(z, t, **cond), neg + 4 * (pos - neg))


def test_student_starts_at_the_teacher_for_every_r_and_dudt_agrees():
    student = SD3Student(FAMILY.tiny_model(0, F64, False), lora=LoraSpec(rank=2))
    z, t, cond = _batch()
    r = torch.rand(2, generator=torch.Generator().manual_seed(3), dtype=F64) * t
    with torch.no_grad():
        assert torch.equal(student(z, r, t, **cond), student.teacher()(z, t, **cond))
    _perturb(student)
    v = torch.randn_like(z)

    def field(z_, r_, t_):
        return student(z_, r_, t_, **cond)

    by = {}
    for method in ("func", "autograd"):
        student.attention = attention_mode_for(method)  # autograd: double backward, math SDPA
        by[method] = total_derivative(field, z, r, t, v, method=method)[1]
    assert max_rel(by["func"], by["autograd"]) < 1e-6  # two AD modes, fp64 (3e-16 measured)


def test_save_load_and_the_stock_lora_loader(tmp_path):
    """A saved student reloads exactly; StableDiffusion3Pipeline.load_lora_weights reads its
    LoRA, which is the student at r = t (the interval embedding is mfcore's own)."""
    student = SD3Student(FAMILY.tiny_model(0, F64, False), lora=LoraSpec(rank=2))
    _perturb(student)
    student.save_pretrained(tmp_path / "s")
    again = load_student(FAMILY.tiny_model(0, F64, False), tmp_path / "s", FAMILY)
    z, t, cond = _batch()
    with torch.no_grad():
        assert torch.equal(again(z, 0.5 * t, t, **cond), student(z, 0.5 * t, t, **cond))
        pipe = tiny_sd3_pipeline()
        pipe.transformer = FAMILY.tiny_model(0, F64, False)
        pipe.load_lora_weights(tmp_path / "s")
        stock = _direct(pipe.transformer, z, t, cond["prompt_embeds"],
                        cond["pooled_prompt_embeds"])  # fmt: skip
        assert_close_to(stock, student(z, t, t, **cond), FP32, "r = t")


def test_the_stock_pipeline_is_the_teacher_on_the_family_grid(sd3_ckpt):
    """StableDiffusion3Pipeline (its encoders, shift, CFG and Euler steps) from the same
    latents gives what mfcore's teacher sampler gives on the family's grid: the time units,
    velocity sign, shift and guidance are the pipeline's. The grid is passed as ``sigmas``
    (uniform, then shifted, as FLUX's pipeline passes it): without them SD3's scheduler
    spaces the steps from 1 down to its smallest training sigma (0.003 at shift 3), not 0."""
    _, pipe = sd3_ckpt
    prompts = ["a red cat", "two birds"]
    noise = seeded_noise((2, 4, 8, 8), 5, "cpu", torch.float32)
    with torch.no_grad():
        ref = pipe(prompts, num_inference_steps=3, height=16, width=16, guidance_scale=3.0,
                   latents=noise, output_type="latent",
                   sigmas=np.linspace(1.0, 1 / 3, 3).tolist()).images  # fmt: skip
        pe, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, None, None)
    cond = {"prompt_embeds": pe, "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": neg, "negative_pooled_prompt_embeds": neg_pooled}  # fmt: skip
    student = SD3Student(pipe.transformer, lora=LoraSpec(rank=2))
    grid = FAMILY.sampling_grid(3, 8, 8, scheduler=dict(pipe.scheduler.config))
    ours = sample_teacher(student.teacher(true_cfg_scale=3.0), noise, 3, grid=grid, cond=cond)
    assert_close_to(ours, ref, FP32, "teacher sampling")


def test_prepare_and_prompt_to_image(tmp_path, sd3_ckpt, capsys):
    """prepare writes the pipeline's own encodings; a saved student makes images from a
    prompt through MeanFlowPipeline, its MeanFlow steps from the seeded noise."""
    path, pipe = sd3_ckpt
    assert detect_family(path) == "sd3"
    (tmp_path / "p.txt").write_text("a red cat\ntwo birds\n")
    assert main(["prepare", "--model", str(path), "--prompts", str(tmp_path / "p.txt"),
                 "--output", str(tmp_path / "data"), "--height", "16", "--width", "16",
                 "--teacher-steps", "2", "--dtype", "fp32"]) == 0  # fmt: skip
    data = load_file(str(tmp_path / "data" / "samples-00000.safetensors"))
    pe, _, pooled, _ = pipe.encode_prompt(["a red cat", "two birds"], None, None,
                                          do_classifier_free_guidance=False)  # fmt: skip
    assert_close_to(data["prompt_embeds"], pe, FP32, "prompt_embeds")
    assert_close_to(data["pooled_prompt_embeds"], pooled, FP32, "pooled")
    assert data["latents"].shape == (2, 4, 8, 8)

    transformer, _ = FAMILY.load_model(str(path), torch.float32)
    student = SD3Student(transformer, lora=LoraSpec(rank=2))
    _perturb(student)
    student.save_pretrained(tmp_path / "s")
    mf = MeanFlowPipeline.from_pretrained(path, student=tmp_path / "s", torch_dtype=torch.float32)
    result = mf("a red cat", num_inference_steps=2, height=16, width=16, seed=4,
                output_type="np")  # fmt: skip
    assert result.images.shape == (1, 16, 16, 3) and np.isfinite(result.images).all()
    noise = seeded_noise((1, 4, 8, 8), 4, "cpu", torch.float32)
    cond = {"prompt_embeds": pe[:1], "pooled_prompt_embeds": pooled[:1]}
    with torch.no_grad():
        z = sample_meanflow(student.eval(), noise, 2, grid=FAMILY.sampling_grid(2, 8, 8,
                            scheduler=dict(pipe.scheduler.config)), cond=cond)  # fmt: skip
    assert_close_to(result.latents, z, FP32, "2 steps")


def test_bad_calls_name_the_input():
    student = SD3Student(FAMILY.tiny_model(0, torch.float32, False), lora=LoraSpec(rank=2))
    z, t, cond = _batch(torch.float32)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        student(z, t, t, prompt_embeds=cond["prompt_embeds"])
    with pytest.raises(ValueError, match="height and width divisible by 2"):
        student(z[..., :3], t, t, **cond)
    with pytest.raises(ValueError, match=r"prompt_embeds must have shape \(2, L, 16\)"):
        student(z, t, t, **{**cond, "prompt_embeds": cond["prompt_embeds"][..., :8]})
    with pytest.raises(ValueError, match="guidance embedding"):
        FAMILY.tiny_model(0, torch.float32, True)
    with pytest.raises(TypeError, match="SD3Transformer2DModel"):
        SD3Student(torch.nn.Linear(2, 2))


def test_trainable_fraction_at_the_sd35_large_config_on_meta():
    """SD3.5 Large (38 blocks of width 64 x 38; its released config), LoRA of rank 64 on the
    attention projections plus the interval embedding, built on the meta device."""
    config = dict(TINY_SD3_CONFIG, sample_size=128, in_channels=16, out_channels=16,
                  num_layers=38, attention_head_dim=64, num_attention_heads=38,
                  joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, pos_embed_max_size=192,
                  qk_norm="rms_norm")  # fmt: skip
    from diffusers import SD3Transformer2DModel

    counts = meta_counts(lambda: SD3Transformer2DModel(**config), FAMILY, LoraSpec(rank=64))
    assert 8.0e9 < counts["base"] < 8.3e9, counts  # the released 8.1B
    assert 0 < counts["fraction"] < 0.02, counts


def test_the_docs_show_the_whole_family():
    """docs/adapters.md's walk-through is adapters/sd3.py as it is (after its docstring)."""
    from tests._doc_blocks import ROOT, iter_blocks

    blocks = [b for b in iter_blocks(ROOT / "docs" / "adapters.md")
              if b.marker is not None and b.marker.arg == "sd3_family"]  # fmt: skip
    source = (ROOT / "adapters" / "sd3.py").read_text()
    code = source[source.index("from __future__ import annotations") :]
    assert len(blocks) == 1 and blocks[0].code.strip() == code.strip()
    assert len(source.splitlines()) <= 150  # a new family in about 150 lines (issue 23)
