"""FLUX adapter on a tiny random FluxTransformer2DModel (diffusers' own test config), float64."""

from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from hypothesis import given, settings
from hypothesis import strategies as st

from mfcore.adapters.flux import (
    FAMILY,
    FLUX_DEV_CONFIG,
    TINY_FLUX_CONFIG,
    FluxStudent,
    FluxTeacher,
    attention_mode_for,
    flux_mu,
    latent_image_ids,
    pack_latents,
    text_ids,
    unpack_latents,
)
from mfcore.adapters.generation import decode_latents, generate_latents
from mfcore.adapters.lora import LORA_WEIGHT_NAME, LoraSpec, lora_disabled
from mfcore.adapters.pipeline import MeanFlowPipeline
from mfcore.jvp import JVP_METHODS, total_derivative
from mfcore.path import FlowPoint
from mfcore.targets import DifferentialTarget
from mfcore.time import uniform_grid
from tests._rules_check import assert_rules_change_nothing

F64 = torch.float64
SETTINGS = settings(max_examples=8, deadline=None)


def tiny(guidance: bool, seed: int = 0, dtype=F64) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**dict(TINY_FLUX_CONFIG, guidance_embeds=guidance)).to(dtype)


def batch(b: int = 3, h: int = 4, w: int = 6, seq: int = 5, seed: int = 1, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 1, h, w, generator=g, dtype=dtype)
    t = torch.rand(b, generator=g, dtype=dtype)
    r = t * torch.rand(b, generator=g, dtype=dtype)
    cond = {
        "prompt_embeds": torch.randn(b, seq, 32, generator=g, dtype=dtype),
        "pooled_prompt_embeds": torch.randn(b, 32, generator=g, dtype=dtype),
    }
    return z, r, t, cond


def perturb(student: FluxStudent, scale: float = 0.1, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def direct_call(tr, z, t, cond, guidance=None):
    """The transformer called by hand the way FluxPipeline does (independent packing)."""
    b, c, h, w = z.shape
    packed = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, 4 * c)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(z.dtype)
    txt = torch.zeros(cond["prompt_embeds"].shape[1], 3, dtype=z.dtype)
    g = None if guidance is None else torch.full((b,), guidance, dtype=torch.float32)
    with torch.no_grad():
        out = tr(
            hidden_states=packed,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt,
            guidance=g,
            return_dict=False,
        )[0]
    return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


# --------------------------------------------------------------------------- latents, ids, times


@SETTINGS
@given(b=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 4), w=st.integers(1, 4))
def test_pack_unpack_round_trip(b, c, h, w):
    z = torch.randn(b, c, 2 * h, 2 * w, dtype=F64)
    tokens = pack_latents(z)
    assert tokens.shape == (b, h * w, 4 * c)
    # token (i, j) holds the 2x2 patch at rows 2i..2i+1, cols 2j..2j+1, channel-major
    i, j = h - 1, w - 1
    patch = z[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(b, 4 * c)
    assert torch.equal(tokens[:, i * w + j], patch)
    assert torch.equal(unpack_latents(tokens, 2 * h, 2 * w), z)


def test_ids():
    ids = latent_image_ids(4, 6)
    assert ids.shape == (6, 3)
    assert torch.equal(ids[4], torch.tensor([0.0, 1.0, 1.0]))
    assert torch.equal(text_ids(5), torch.zeros(5, 3))


@pytest.mark.parametrize(
    "bad", [torch.zeros(1, 1, 3, 4), torch.zeros(1, 4, 4), torch.zeros(1, 1, 4, 5)]
)
def test_pack_rejects_bad_shapes(bad):
    with pytest.raises(ValueError, match="latents"):
        pack_latents(bad)


def test_unpack_rejects_mismatch():
    with pytest.raises(ValueError, match="patches"):
        unpack_latents(torch.zeros(1, 6, 4), 4, 4)
    with pytest.raises(ValueError, match="height"):
        unpack_latents(torch.zeros(1, 6, 4), 3, 8)
    with pytest.raises(ValueError, match="ids|height"):
        latent_image_ids(3, 4)


@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 6000])
def test_flux_mu_matches_pipeline(seq_len):
    assert flux_mu(seq_len) == pytest.approx(calculate_shift(seq_len), rel=1e-12)
    cfg = {"base_image_seq_len": 64, "max_image_seq_len": 1024, "base_shift": 0.2, "max_shift": 1.0}
    assert flux_mu(seq_len, cfg) == pytest.approx(calculate_shift(seq_len, 64, 1024, 0.2, 1.0))


@pytest.mark.parametrize("steps", [1, 2, 4, 28])
def test_grid_matches_flux_scheduler(steps):
    h, w = 64, 96
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    mu = calculate_shift(h * w // 4)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)
    grid = FAMILY.sampling_grid(steps, h, w, dtype=F64)
    assert torch.allclose(grid, sched.sigmas.to(F64), atol=1e-6)
    assert torch.equal(uniform_grid(steps, dtype=F64)[[0, -1]], grid[[0, -1]])


def test_velocity_sign_matches_scheduler_step():
    """FLUX's scheduler steps z + (sigma_next - sigma) * out: out is eps - x, our v."""
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(sigmas=[1.0, 0.6], mu=None)
    gen = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 2, 8, generator=gen, dtype=F64)
    t, r = 0.6, 0.0  # the second (last) step: sigma 0.6 -> 0
    z_t = (1 - t) * x + t * eps
    sched._step_index = 1
    out = sched.step(eps - x, sched.timesteps[1], z_t, return_dict=False)[0]
    # the scheduler steps in fp32 (it upcasts the sample): fp32 rounding, not fp64's
    torch.testing.assert_close(out, z_t - (t - r) * (eps - x), rtol=0, atol=1e-6)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- teacher


@pytest.mark.parametrize("guidance", [False, True])
def test_teacher_matches_direct_call(guidance):
    tr = tiny(guidance)
    z, _, t, cond = batch()
    v = FluxTeacher(tr, guidance_scale=2.5)(z, t, **cond)
    ref = direct_call(tr, z, t, cond, 2.5 if guidance else None)
    assert v.dtype == F64 and v.shape == z.shape
    assert torch.equal(v, ref)
    assert not v.requires_grad


def test_teacher_guidance_is_used():
    tr = tiny(True)
    z, _, t, cond = batch()
    teacher = FluxTeacher(tr)
    v1 = teacher(z, t, **cond, guidance=1.0)
    v4 = teacher(z, t, **cond, guidance=torch.full((3,), 4.0, dtype=F64))
    assert torch.equal(v1, direct_call(tr, z, t, cond, 1.0))
    assert torch.equal(v4, direct_call(tr, z, t, cond, 4.0))
    assert not torch.allclose(v1, v4)


def test_teacher_true_cfg():
    tr = tiny(False)
    z, _, t, cond = batch()
    _, _, _, neg = batch(seed=5, seq=3)
    negs = {"negative_" + k: v for k, v in neg.items()}
    v = FluxTeacher(tr, true_cfg_scale=4.0)(z, t, **cond, **negs)
    pos, vn = direct_call(tr, z, t, cond), direct_call(tr, z, t, neg)
    assert torch.allclose(v, vn + 4.0 * (pos - vn), atol=1e-12)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        FluxTeacher(tr, true_cfg_scale=4.0)(z, t, **cond)
    with pytest.raises(ValueError, match="true_cfg_scale"):
        FluxTeacher(tr, true_cfg_scale=0.5)


def test_teacher_input_errors():
    tr, trg = tiny(False), tiny(True)
    z, _, t, cond = batch()
    teacher = FluxTeacher(tr)
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        FluxTeacher(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="channels"):
        teacher(torch.randn(3, 2, 4, 6, dtype=F64), t, **cond)
    with pytest.raises(ValueError, match="height and width divisible by 2"):
        teacher(torch.randn(3, 1, 5, 6, dtype=F64), t, **cond)
    with pytest.raises(ValueError, match="prompt_embeds"):
        teacher(
            z,
            t,
            prompt_embeds=cond["prompt_embeds"][..., :8],
            pooled_prompt_embeds=cond["pooled_prompt_embeds"],
        )
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        teacher(
            z,
            t,
            prompt_embeds=cond["prompt_embeds"],
            pooled_prompt_embeds=cond["pooled_prompt_embeds"][:2],
        )
    with pytest.raises(ValueError, match="t must"):
        teacher(z, t + 1.0, **cond)
    with pytest.raises(ValueError, match="guidance embedding"):
        teacher(z, t, **cond, guidance=3.0)
    with pytest.raises(TypeError, match="guidance"):
        FluxTeacher(trg)(z, t, **cond, guidance="high")
    with pytest.raises(ValueError, match="guidance"):
        FluxTeacher(trg)(z, t, **cond, guidance=torch.ones(2))


# --------------------------------------------------------------------------- student


@pytest.mark.parametrize("guidance", [False, True])
@SETTINGS
@given(seed=st.integers(0, 2**16))
def test_student_equals_teacher_at_init(guidance, seed):
    tr = tiny(guidance)
    student = FluxStudent(tr, lora=LoraSpec(rank=4))
    z, r, t, cond = batch(seed=seed)
    u = student(z, r, t, **cond)
    v = student.teacher()(z, t, **cond)
    assert torch.equal(u, v)
    assert torch.equal(v, direct_call(tr, z, t, cond, 3.5 if guidance else None))


@pytest.mark.parametrize("guidance", [False, True])
def test_trained_student_leaves_teacher_alone(guidance):
    tr = tiny(guidance)
    z, r, t, cond = batch()
    ref = direct_call(tr, z, t, cond, 3.5 if guidance else None)
    student = FluxStudent(tr, lora=LoraSpec(rank=4))
    perturb(student)
    u = student(z, r, t, **cond)
    assert not torch.allclose(u, ref)
    assert torch.equal(student.teacher()(z, t, **cond), ref)
    # the interval branch responds to t - r, and vanishes at r = t (LoRA alone remains)
    r2 = t * 0.5
    assert not torch.allclose(student(z, r2, t, **cond), u)
    # outside the student's call the hook adds nothing: a plain call is the LoRA model alone
    lora_only = direct_call(tr, z, t, cond, 3.5 if guidance else None)
    assert not torch.allclose(lora_only, ref)
    assert torch.allclose(student(z, t, t, **cond), lora_only, atol=1e-12)


def test_student_errors():
    tr = tiny(False)
    student = FluxStudent(tr, lora=LoraSpec(rank=2))
    z, r, t, cond = batch()
    with pytest.raises(ValueError, match="r must satisfy"):
        student(z, t, r, **cond)
    with pytest.raises(ValueError, match="channels"):
        student(torch.randn(3, 3, 4, 6, dtype=F64), r, t, **cond)
    with pytest.raises(TypeError):
        student(z, r, t, **cond, mask=None)
    with pytest.raises(ValueError, match="rank"):
        LoraSpec(rank=0)
    with pytest.raises(ValueError, match="target_modules"):
        FluxStudent(tiny(False), lora=LoraSpec(rank=2, target_modules=("no_such_layer",)))


def test_lora_disabled_keeps_gradients():
    """A teacher call between the student's forward and backward must not cut the LoRA grads."""
    tr = tiny(True)
    student = FluxStudent(tr, lora=LoraSpec(rank=2))
    perturb(student)
    z, r, t, cond = batch()
    flags = [p.requires_grad for p in tr.parameters()]
    u = student(z, r, t, **cond)
    v = student.teacher()(z, t, **cond)
    with lora_disabled(tr):
        pass
    assert [p.requires_grad for p in tr.parameters()] == flags
    ((u - v) ** 2).mean().backward()
    grads = [p.grad for p in student.trainable_parameters()]
    assert all(g is not None for g in grads)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    frozen = [p for p in tr.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_flux_dev_trainable_fraction_on_meta():
    with torch.device("meta"):
        student = FluxStudent(FluxTransformer2DModel(**FLUX_DEV_CONFIG), lora=LoraSpec(rank=64))
    trainable, total = student.parameter_counts()
    assert 11.5e9 < total - trainable < 12.5e9  # FLUX.1-dev has ~11.9B parameters
    assert trainable / total < 0.05
    assert trainable > 0


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("guidance", [False, True])
def test_save_load_round_trip(tmp_path, guidance):
    tr = tiny(guidance)
    base = {k.replace(".base_layer", ""): v.clone() for k, v in tr.state_dict().items()}
    student = FluxStudent(tr, lora=LoraSpec(rank=4, alpha=8.0), guidance_scale=2.0)
    perturb(student)
    z, r, t, cond = batch()
    u = student(z, r, t, **cond)
    student.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(
        [
            LORA_WEIGHT_NAME,
            "interval_embedding.safetensors",
            "mfcore_flux_student.json",
            "README.md",
        ]
    )
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    fresh = tiny(guidance, seed=123)
    fresh.load_state_dict(base)
    loaded = FluxStudent.from_pretrained(fresh, tmp_path)
    assert loaded.guidance_scale == 2.0
    assert torch.equal(loaded(z, r, t, **cond), u)
    # in-memory state round trip
    fresh2 = tiny(guidance, seed=5)
    fresh2.load_state_dict(base)
    s2 = FluxStudent(fresh2, lora=LoraSpec(rank=4, alpha=8.0), guidance_scale=2.0)
    s2.load_trainable_state_dict(student.trainable_state_dict())
    assert torch.equal(s2(z, r, t, **cond), u)


@pytest.mark.parametrize("guidance", [False, True])
def test_lora_loads_with_diffusers_loader(tmp_path, guidance):
    """Stock FluxPipeline.load_lora_weights gives the student at r = t (alpha scaling kept)."""
    tr = tiny(guidance)
    base = {k.replace(".base_layer", ""): v.clone() for k, v in tr.state_dict().items()}
    student = FluxStudent(tr, lora=LoraSpec(rank=4, alpha=2.0))
    perturb(student)
    student.save_pretrained(tmp_path)
    plain = tiny(guidance, seed=99)
    plain.load_state_dict(base)
    pipe = FluxPipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=plain,
    )  # fmt: skip
    pipe.load_lora_weights(str(tmp_path), adapter_name="distilled")
    z, _, t, cond = batch()
    g = 3.5 if guidance else None
    assert torch.allclose(direct_call(plain, z, t, cond, g), student(z, t, t, **cond), atol=1e-12)
    assert not torch.allclose(
        direct_call(plain, z, t, cond, g), direct_call(tiny(guidance), z, t, cond, g)
    )


def test_load_errors(tmp_path):
    student = FluxStudent(tiny(False), lora=LoraSpec(rank=4))
    with pytest.raises(FileNotFoundError, match="no saved FLUX student"):
        FluxStudent.from_pretrained(tiny(False), tmp_path)
    student.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="LoRA"):
        FluxStudent(tiny(False), lora=LoraSpec(rank=2)).load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="transformer"):
        FluxStudent.from_pretrained(tiny(True), tmp_path)
    meta = json.loads((tmp_path / "mfcore_flux_student.json").read_text())
    meta["format"] = "something.else"
    (tmp_path / "mfcore_flux_student.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not a saved FLUX student"):
        FluxStudent.from_pretrained(tiny(False), tmp_path)
    with pytest.raises(ValueError, match="unexpected"):
        student.load_trainable_state_dict({"other.x": torch.zeros(1)})


# --------------------------------------------------------------------------- JVP through the model


def jvp_setup(guidance: bool, seed: int):
    student = FluxStudent(tiny(guidance), lora=LoraSpec(rank=2))
    perturb(student, seed=seed)
    z, _, t, cond = batch(seed=seed)
    t = 0.2 + 0.6 * t  # keep the finite-difference stencil inside [r, 1]
    r = 0.5 * t
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    return student, z, r, t, v, cond


@pytest.mark.parametrize("guidance", [False, True])
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_dudt_agrees_across_jvp_backends(guidance, seed):
    student, z, r, t, v, cond = jvp_setup(guidance, seed)
    out = {}
    for method in JVP_METHODS:
        student.attention = attention_mode_for(method)
        kw = {"fd_step": 3e-5} if method == "fd" else {}
        out[method] = total_derivative(student, z, r, t, v, method=method, cond=cond, **kw)
    u_ref = student(z, r, t, **cond).detach()
    scale = out["func"][1].abs().max()
    assert scale > 0
    for method, (u, dudt) in out.items():
        assert torch.allclose(u, u_ref, atol=1e-12, rtol=0), method
        assert torch.isfinite(dudt).all()
    assert torch.allclose(out["func"][1], out["autograd"][1], atol=1e-10 * scale, rtol=0)
    # fd: FLUX embeds 1000 t with sinusoids of frequency up to 1 (so d/dt up to 1000) and
    # diffusers computes them in fp32: the step trades curvature (h large) against that
    # rounding (h small); 3e-5 gives ~1e-4 relative error, 1e-3 would give ~10%.
    assert torch.allclose(out["func"][1], out["fd"][1], atol=2e-3 * scale, rtol=0)


def test_tangent_rules_change_no_value_on_flux():
    """Issue 21: the explicit Linear / LayerNorm / GELU / SiLU tangent rules (peft's LoRA
    layers included) leave u, du/dt and the LoRA gradients of the one-forward step as with
    torch's rules, at fp64, through diffusers' FLUX blocks; fewer matmul FLOPs run."""
    student, z, r, t, v, cond = jvp_setup(True, 3)
    student.attention = attention_mode_for("func")
    assert_rules_change_nothing(student, z, r, t, v, cond)


def test_auto_attention_routes_only_under_forward_ad(monkeypatch):
    import mfcore.attention as mfa

    calls = []
    original = mfa.attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(mfa, "attention", counting)
    student, z, r, t, v, cond = jvp_setup(False, 0)
    student(z, r, t, **cond)
    assert not calls  # a plain forward keeps torch's SDPA
    total_derivative(student, z, r, t, v, method="func", cond=cond)
    assert len(calls) == 2  # one double-stream and one single-stream block
    student.attention = "mfcore"
    calls.clear()
    student(z, r, t, **cond)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="attention"):
        student.attention = "flash"
    with pytest.raises(ValueError, match="jvp_method"):
        attention_mode_for("exact")


@pytest.mark.parametrize(
    "method, single_forward", [("func", True), ("func", False), ("autograd", True), ("fd", False)]
)
def test_differential_target_gradients_with_checkpointing(method, single_forward):
    """The differential target's gradients do not change with gradient checkpointing."""
    grads = []
    for checkpointing in (False, True):
        student, z, r, t, v, cond = jvp_setup(True, 3)
        student.attention = attention_mode_for(method)
        if checkpointing:
            student.transformer.enable_gradient_checkpointing()
        target = DifferentialTarget(method, single_forward=single_forward)
        out = target(student, FlowPoint(z, r, t, v, cond))
        ((out.pred - out.target) ** 2).mean().backward()
        grads.append([p.grad.clone() for p in student.trainable_parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-9)


# --------------------------------------------------------------------------- generation


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        sample_size=16,
        shift_factor=0.1,
        scaling_factor=1.5,
    )


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_generate_latents_follows_meanflow_steps(steps):
    student = FluxStudent(tiny(True, dtype=torch.float32), lora=LoraSpec(rank=2))
    perturb(student)
    _, _, _, cond = batch(b=2, dtype=torch.float32)
    z0 = generate_latents(student, cond, height=4, width=6, steps=steps, seed=11)
    again = generate_latents(student, cond, height=4, width=6, steps=steps, seed=11)
    assert z0.shape == (2, 1, 4, 6) and torch.equal(z0, again)
    # by hand: noise from the seed, then z_r = z_t - (t - r) u(z_t, r, t) on the shifted grid
    z = torch.randn(2, 1, 4, 6, generator=torch.Generator().manual_seed(11))
    grid = FAMILY.sampling_grid(steps, 4, 6)
    with torch.no_grad():
        for t_, r_ in zip(grid[:-1], grid[1:], strict=True):
            t, r = t_.expand(2), r_.expand(2)
            z = z - (t_ - r_) * student(z, r, t, **cond)
    assert torch.allclose(z0, z, atol=1e-6)
    other = generate_latents(student, cond, height=4, width=6, steps=steps, seed=12)
    assert not torch.allclose(z0, other)


def test_generate_images_end_to_end():
    student = FluxStudent(tiny(False, dtype=torch.float32), lora=LoraSpec(rank=2))
    _, _, _, cond = batch(b=2, dtype=torch.float32)
    pipe = MeanFlowPipeline(student, vae=tiny_vae())
    images = pipe(cond=cond, height=8, width=12, num_inference_steps=2, seed=0).images
    assert len(images) == 2
    assert all(isinstance(im, PIL.Image.Image) and im.size == (12, 8) for im in images)
    with pytest.raises(ValueError, match="multiple of 4 pixels"):  # 3 latent rows: 2x2 patches
        pipe(cond=cond, height=6, width=12)


def test_decode_latents_undoes_normalisation():
    vae = tiny_vae()
    latents = torch.randn(1, 1, 4, 4)
    out = decode_latents(vae, latents, output_type="pt")
    with torch.no_grad():
        ref = vae.decode(latents / 1.5 + 0.1, return_dict=False)[0]
    assert torch.allclose(out, (ref / 2 + 0.5).clamp(0, 1), atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        decode_latents(vae, torch.randn(1, 2, 4, 4))
