"""HunyuanImage 2.1 on the adapter core, on tiny random HunyuanImageTransformer2DModels (fp64)."""

from __future__ import annotations

import os

import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKLHunyuanImage, HunyuanImageTransformer2DModel
from hypothesis import given, settings
from hypothesis import strategies as st

from mfcore.adapters.generation import decode_latents, generate_latents
from mfcore.adapters.hunyuanimage2 import (
    FAMILY,
    HY21_BASE_CONFIG,
    TINY_HY21_CONFIG,
    HunyuanImage2Student,
    HunyuanMeanFlow,
    lora_targets,
)
from mfcore.adapters.lora import LORA_WEIGHT_NAME, LoraSpec
from mfcore.adapters.routing import attention_mode_for, enable_gradient_checkpointing
from mfcore.adapters.student import Teacher, load_student
from mfcore.jvp import JVP_METHODS, total_derivative
from mfcore.path import FlowPoint
from mfcore.targets import DifferentialTarget
from tests._close import FP64, assert_close_to
from tests._rules_check import assert_rules_change_nothing

F64 = torch.float64


def tiny(seed: int = 0, dtype=F64, **overrides) -> HunyuanImageTransformer2DModel:
    torch.manual_seed(seed)
    return HunyuanImageTransformer2DModel(**(TINY_HY21_CONFIG | overrides)).to(dtype)


def batch(b: int = 2, seed: int = 1, dtype=F64, byt5: int | None = None):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 4, 4, 4, generator=g, dtype=dtype)
    t = 0.05 + 0.9 * torch.rand(b, generator=g, dtype=dtype)
    r = t * torch.rand(b, generator=g, dtype=dtype)
    mask = torch.ones(b, 6, dtype=torch.long)
    mask[-1, 4:] = 0  # a padded prompt
    cond = {"prompt_embeds": torch.randn(b, 6, 24, generator=g, dtype=dtype)}
    cond["prompt_attention_mask"] = mask
    if byt5:
        cond["prompt_embeds_2"] = torch.randn(b, 5, byt5, generator=g, dtype=dtype)
        mask2 = torch.zeros(b, 5, dtype=torch.long)
        mask2[0, :3] = 1  # glyph text in the first prompt only, as the pipeline pads
        cond["prompt_attention_mask_2"] = mask2
    return z, r, t, cond


def perturb(module, scale: float = 0.1, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def direct(tr, z, t, cond, guidance=None, r=None):
    """The transformer called by hand the way HunyuanImagePipeline does (sigma * 1000)."""
    kw = {}
    if "prompt_embeds_2" in cond:
        kw = dict(
            encoder_hidden_states_2=cond["prompt_embeds_2"],
            encoder_attention_mask_2=cond["prompt_attention_mask_2"],
        )
    with torch.no_grad():
        return tr(
            hidden_states=z,
            timestep=t * 1000,
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_attention_mask=cond["prompt_attention_mask"],
            timestep_r=None if r is None else r * 1000,
            guidance=None if guidance is None else torch.full_like(t, guidance * 1000),
            return_dict=False,
            **kw,
        )[0]


# --------------------------------------------------------------------------- teacher


@pytest.mark.parametrize("variant", ["base", "guidance", "byt5"])
def test_teacher_matches_direct_call(variant):
    over = {"guidance": {"guidance_embeds": True}, "byt5": {"text_embed_2_dim": 12}}
    tr = tiny(**over.get(variant, {}))
    z, _, t, cond = batch(byt5=12 if variant == "byt5" else None)
    v = Teacher(tr, FAMILY, guidance_scale=2.5)(z, t, **cond)
    assert torch.equal(v, direct(tr, z, t, cond, 2.5 if variant == "guidance" else None))
    assert not v.requires_grad and v.dtype == F64


def test_teacher_two_pass_cfg():
    tr = tiny()
    z, _, t, cond = batch()
    _, _, _, neg = batch(seed=5)
    negs = {"negative_" + k: v for k, v in neg.items()}
    v = Teacher(tr, FAMILY, true_cfg_scale=3.0)(z, t, **cond, **negs)
    pos, vn = direct(tr, z, t, cond), direct(tr, z, t, neg)
    torch.testing.assert_close(v, vn + 3.0 * (pos - vn), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        Teacher(tr, FAMILY, true_cfg_scale=3.0)(z, t, **cond)


def test_teacher_two_pass_apg_is_the_release_guiders():
    """rule="apg": diffusers' AdaptiveProjectedMixGuidance past its CFG steps, momentum off,
    on the teacher's two passes."""
    from diffusers.guiders import AdaptiveProjectedMixGuidance

    tr = tiny()
    z, _, t, cond = batch()
    _, _, _, neg = batch(seed=5)
    negs = {"negative_" + k: v for k, v in neg.items()}
    v = Teacher(tr, FAMILY, true_cfg_scale=10.0, rule="apg", apg_norm_threshold=0.5)(
        z, t, **cond, **negs
    )
    guider = AdaptiveProjectedMixGuidance(
        adaptive_projected_guidance_scale=10.0,
        adaptive_projected_guidance_momentum=None,
        adaptive_projected_guidance_rescale=0.5,
        adaptive_projected_guidance_start_step=0,
    )
    guider.set_state(step=3, num_inference_steps=10, timestep=t[0])
    assert guider._is_apg_enabled()  # step 3 > start 0: APG, not its CFG steps
    want = guider.forward(direct(tr, z, t, cond), direct(tr, z, t, neg)).pred
    torch.testing.assert_close(v, want, rtol=1e-10, atol=1e-10)  # fp64 model: fp64 rounding
    cfg = Teacher(tr, FAMILY, true_cfg_scale=10.0)(z, t, **cond, **negs)
    assert (v - cfg).abs().max() > 1e-3  # a different rule, not CFG renamed
    with pytest.raises(ValueError, match="rule"):
        Teacher(tr, FAMILY, true_cfg_scale=3.0, rule="pag")


def test_input_errors():
    tr = tiny()
    z, r, t, cond = batch()
    teacher = Teacher(tr, FAMILY)
    with pytest.raises(TypeError, match="HunyuanImageTransformer2DModel"):
        Teacher(torch.nn.Linear(2, 2), FAMILY)
    with pytest.raises(ValueError, match="channels|\\(B, 4, H, W\\)"):
        teacher(torch.randn(2, 3, 4, 4, dtype=F64), t, **cond)
    with pytest.raises(ValueError, match="prompt_embeds"):
        teacher(z, t, prompt_embeds=cond["prompt_embeds"][..., :8])
    with pytest.raises(ValueError, match="prompt_attention_mask"):
        teacher(z, t, prompt_embeds=cond["prompt_embeds"], prompt_attention_mask=torch.ones(2, 3))
    with pytest.raises(TypeError, match="prompt_embeds"):
        teacher(z, t)
    with pytest.raises(TypeError, match="mask"):
        teacher(z, t, **cond, mask=None)
    with pytest.raises(ValueError, match="guidance embedding"):
        teacher(z, t, **cond, guidance=3.0)
    with pytest.raises(ValueError, match="t must"):
        teacher(z, t + 1.0, **cond)
    with pytest.raises(ValueError, match="r must satisfy"):
        HunyuanImage2Student(tr, lora=LoraSpec(rank=2))(z, t, r, **cond)


# --------------------------------------------------------------------------- student


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), guidance=st.booleans())
def test_student_equals_teacher_at_init(seed, guidance):
    tr = tiny(guidance_embeds=guidance)
    student = HunyuanImage2Student(tr, lora=LoraSpec(rank=4))
    z, r, t, cond = batch(seed=seed)
    u = student(z, r, t, **cond)
    assert torch.equal(u, student.teacher()(z, t, **cond))
    assert torch.equal(u, direct(tr, z, t, cond, 3.5 if guidance else None))


def test_lora_targets_are_the_blocks_only():
    tr = tiny(num_layers=2, num_single_layers=2, num_refiner_layers=2)
    student = HunyuanImage2Student(tr, lora=LoraSpec(rank=2))
    hit = {n.split(".lora_A")[0] for n, _ in tr.named_parameters() if ".lora_A." in n}
    assert hit and all(
        n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in hit
    )
    assert len(hit) == len(lora_targets(tr.config)) == 2 * 12 + 2 * 5
    assert not any("context_embedder" in n or n == "proj_out" for n in hit)
    assert student.lora_spec.target_modules == lora_targets(tr.config)


def test_trained_student_leaves_teacher_alone():
    tr = tiny()
    z, r, t, cond = batch()
    ref = direct(tr, z, t, cond)
    student = HunyuanImage2Student(tr, lora=LoraSpec(rank=4))
    perturb(student)
    u = student(z, r, t, **cond)
    assert not torch.allclose(u, ref)
    # two code paths (LoRA disabled through the student, a direct call) in fp64
    assert_close_to(student.teacher()(z, t, **cond), ref, FP64)
    lora_only = direct(tr, z, t, cond)  # a plain call: LoRA on, no interval branch
    torch.testing.assert_close(student(z, t, t, **cond), lora_only, rtol=0, atol=1e-12)
    assert not torch.allclose(student(z, 0.5 * t, t, **cond), u)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_dudt_agrees_across_jvp_backends(seed):
    student = HunyuanImage2Student(tiny(text_embed_2_dim=12), lora=LoraSpec(rank=2))
    perturb(student, seed=seed)
    z, _, t, cond = batch(seed=seed, byt5=12)
    t = 0.2 + 0.6 * t
    r = 0.5 * t
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    out = {}
    for method in JVP_METHODS:
        student.attention = attention_mode_for(method)
        kw = {"fd_step": 3e-5} if method == "fd" else {}
        out[method] = total_derivative(student, z, r, t, v, method=method, cond=cond, **kw)[1]
    scale = out["func"].abs().max()
    assert scale > 0
    torch.testing.assert_close(out["autograd"], out["func"], rtol=0, atol=1e-6 * scale)
    # fd: the time sinusoids, RoPE and RMSNorm run in fp32 inside diffusers even on an fp64
    # model, so a finite difference bottoms out near 1e-4 relative (docs/hunyuanimage.md)
    torch.testing.assert_close(out["fd"], out["func"], rtol=0, atol=2e-3 * scale)


def test_tangent_rules_change_no_value_on_hunyuanimage2():
    """Issue 21: the explicit tangent rules leave the one-forward step unchanged (fp64)."""
    student = HunyuanImage2Student(tiny(text_embed_2_dim=12), lora=LoraSpec(rank=2))
    perturb(student, seed=4)
    z, _, t, cond = batch(seed=4, byt5=12)
    t = 0.2 + 0.6 * t
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    student.attention = attention_mode_for("func")
    assert_rules_change_nothing(student, z, 0.5 * t, t, v, cond)


@pytest.mark.parametrize("method, single_forward", [("func", True), ("func", False)])
def test_checkpointing_with_keyword_block_arguments(method, single_forward):
    """diffusers' own checkpointing raises on this model (keyword block arguments); ours
    gives the gradients of an unchecked run."""
    grads = []
    for checkpointing in (False, True):
        student = HunyuanImage2Student(tiny(), lora=LoraSpec(rank=2))
        perturb(student, seed=3)
        if checkpointing:
            enable_gradient_checkpointing(student.transformer)
        z, r, t, cond = batch(seed=3)
        v = torch.randn_like(z)
        target = DifferentialTarget(method, single_forward=single_forward)
        out = target(student, FlowPoint(z, r, t, v, cond))
        ((out.pred - out.target) ** 2).mean().backward()
        grads.append([p.grad.clone() for p in student.trainable_parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_trainable_fraction_at_the_real_config_on_meta():
    with torch.device("meta"):
        model = HunyuanImageTransformer2DModel(**HY21_BASE_CONFIG)
        student = HunyuanImage2Student(model, lora=LoraSpec(rank=64))
    trainable, total = student.parameter_counts()
    assert 17.3e9 < total - trainable < 17.5e9  # HunyuanImage-2.1 has 17.43B parameters
    assert 0.015 < trainable / total < 0.025  # 321M LoRA + the interval MLP


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip_and_the_stock_loader(tmp_path):
    tr = tiny(guidance_embeds=True)
    base = {k.replace(".base_layer", ""): v.clone() for k, v in tr.state_dict().items()}
    student = HunyuanImage2Student(tr, lora=LoraSpec(rank=4, alpha=8.0), guidance_scale=2.0)
    perturb(student)
    z, r, t, cond = batch()
    u = student(z, r, t, **cond)
    student.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(
        [
            LORA_WEIGHT_NAME,
            "interval_embedding.safetensors",
            FAMILY.student_config_name,
            "README.md",
        ]
    )
    fresh = tiny(seed=9, guidance_embeds=True)
    fresh.load_state_dict(base)
    loaded = load_student(fresh, tmp_path, FAMILY)
    assert loaded.guidance_scale == 2.0 and torch.equal(loaded(z, r, t, **cond), u)
    # diffusers has no HunyuanImage pipeline LoRA loader: the model's own reads the file
    plain = tiny(seed=11, guidance_embeds=True)
    plain.load_state_dict(base)
    plain.load_lora_adapter(str(tmp_path), weight_name=LORA_WEIGHT_NAME, prefix=None)
    torch.testing.assert_close(
        direct(plain, z, t, cond, 2.0), student(z, t, t, **cond), rtol=0, atol=1e-12
    )
    with pytest.raises(FileNotFoundError, match="HunyuanImage 2.1"):
        load_student(fresh, tmp_path / "nothing", FAMILY)


# --------------------------------------------------------------------------- generation


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKLHunyuanImage(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        sample_size=128,
    )


def euler_by_hand(field, cond, steps, seed, shift):
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
    s = torch.linspace(1, 0, steps + 1)
    grid = shift * s / (1 + (shift - 1) * s)
    with torch.no_grad():
        for t_, r_ in zip(grid[:-1], grid[1:], strict=True):
            z = z - (t_ - r_) * field(z, r_.expand(2), t_.expand(2), **cond)
    return z


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_generation_follows_meanflow_steps_and_decodes(steps):
    student = HunyuanImage2Student(tiny(dtype=torch.float32), lora=LoraSpec(rank=2))
    perturb(student)
    _, _, _, cond = batch(dtype=torch.float32)
    z0 = generate_latents(student, cond, height=4, width=4, steps=steps, seed=3)
    by_hand = euler_by_hand(student, cond, steps, 3, shift=5.0)
    torch.testing.assert_close(z0, by_hand, rtol=0, atol=1e-6)
    shifted = generate_latents(
        student, cond, height=4, width=4, steps=steps, seed=3, scheduler={"shift": 2.0}
    )
    torch.testing.assert_close(
        shifted, euler_by_hand(student, cond, steps, 3, 2.0), rtol=0, atol=1e-6
    )
    images = decode_latents(tiny_vae(), z0)
    assert len(images) == 2 and all(isinstance(im, PIL.Image.Image) for im in images)
    assert images[0].size == (32, 32)


def test_native_meanflow_checkpoint_runs_through_the_sampler():
    tr = tiny(dtype=torch.float32, use_meanflow=True, guidance_embeds=True)
    field = HunyuanMeanFlow(tr)
    z, r, t, cond = batch(dtype=torch.float32)
    assert torch.equal(field(z, r, t, **cond), direct(tr, z, t, cond, 3.25, r=r))
    for steps in (1, 2):
        z0 = generate_latents(field, cond, height=4, width=4, steps=steps, seed=1)
        torch.testing.assert_close(z0, euler_by_hand(field, cond, steps, 1, 5.0), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="use_meanflow"):
        HunyuanMeanFlow(tiny())


def test_the_refiner_is_refused_by_name():
    """The 2.1 stage-2 refiner (3-D patches, more input channels) is not a model mfcore can
    distil: it is named, not refused as a mere patch size."""
    refiner = HunyuanImageTransformer2DModel(
        **dict(TINY_HY21_CONFIG, patch_size=[1, 1, 1], in_channels=8, rope_axes_dim=(4, 6, 6))
    )
    with pytest.raises(ValueError, match="refiner .* does not support"):
        HunyuanImage2Student(refiner, lora=LoraSpec(rank=2))
