"""HunyuanImage 3.0 (NeMo Automodel's native class) on the adapter core, tiny random models."""

from __future__ import annotations

import os

import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL
from hypothesis import given, settings
from hypothesis import strategies as st
from nemo_automodel.components.models.common import BackendConfig
from nemo_automodel.components.models.hunyuan_image3.config import HunyuanImage3Config
from nemo_automodel.components.models.hunyuan_image3.model import HunyuanImage3ForCausalMM
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors import safe_open

from mfcore.adapters.generation import decode_latents, generate_latents
from mfcore.adapters.hunyuanimage3 import (
    BACKEND,
    FAMILY,
    TINY_HY3_CONFIG,
    HunyuanImage3Student,
    SequenceBuilder,
    _tiny_vocab,
    build_model,
    release_ratio_index,
)
from mfcore.adapters.lora import LORA_WEIGHT_NAME, LoraSpec
from mfcore.adapters.routing import attention_mode_for
from mfcore.adapters.sizes import meta_counts
from mfcore.adapters.student import Teacher, load_student
from mfcore.jvp import total_derivative
from tests._rules_check import assert_rules_change_nothing

F64 = torch.float64


def tiny(seed: int = 0, dtype=F64):
    return build_model(TINY_HY3_CONFIG, dtype, seed)


def batch(b: int = 2, seed: int = 1, dtype=F64, negative: bool = False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 4, 4, 4, generator=g, dtype=dtype)
    t = 0.05 + 0.9 * torch.rand(b, generator=g, dtype=dtype)
    r = t * torch.rand(b, generator=g, dtype=dtype)
    prompts = [[10 + i for i in range(3 + k)] for k in range(b)]  # rows of different lengths
    builder = SequenceBuilder(_tiny_vocab(), 0)
    cond = builder(prompts, (4, 4), "")
    if negative:
        cond |= builder(prompts, (4, 4), "negative_")
    return z, r, t, cond


def perturb(module, scale: float = 0.1, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def direct(model, z, t, ids, lengths):
    with torch.no_grad():
        return model(ids, z, t * 1000, lengths)[0]


def test_sequence_layout():
    _, _, _, cond = batch(negative=True)
    ids, lengths = cond["input_ids"], cond["valid_lengths"]
    assert ids[0, :6].tolist() == [1, 10, 11, 12, 2, 3] and ids[0, 6:8].tolist() == [4, 5]
    assert lengths.tolist() == [1 + 3 + 4 + 16 + 1, 1 + 4 + 4 + 16 + 1]
    assert (ids == 6).sum(1).tolist() == [16, 16] and ids[0, lengths[0] :].eq(0).all()
    neg = cond["negative_input_ids"]
    assert neg[1, 1:5].tolist() == [8] * 4 and torch.equal(neg[:, 5:], ids[:, 5:])


# The release's buckets at 1024 (height, width), written out from its rule: the square, then
# 16 taller sizes (height +64, width -64, each clamped to [512, 2048]) and their mirrors.
TALL = [(min(1024 + 64 * k, 2048), max(1024 - 64 * k, 512)) for k in range(1, 17)]
BUCKETS = sorted([(1024, 1024), *TALL, *[(w, h) for h, w in TALL]], key=lambda s: s[0] / s[1])


def test_ratio_buckets_of_the_release():
    assert len(BUCKETS) == 33 and BUCKETS[0] == (512, 2048) and BUCKETS[32] == (2048, 512)
    for i, (h, w) in enumerate(BUCKETS):  # each bucket's own size, at pixel and latent scale
        assert release_ratio_index(h, w) == i == release_ratio_index(h // 16, w // 16)
    assert release_ratio_index(4, 4) == 16  # the square is the middle one, not <img_ratio_0>
    assert release_ratio_index(1024, 768) == 18  # 4:3 tall -> 1152 x 896 (ratio 1.286)
    assert release_ratio_index(64, 128) == 11  # 1:2 wide -> 704 x 1344 (ratio 0.524)
    assert release_ratio_index(1, 100) == 0 and release_ratio_index(100, 1) == 32
    assert release_ratio_index(256, 256, base_size=256) == 16


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4096), st.integers(1, 4096), st.integers(1, 4096), st.integers(1, 4096))
def test_ratio_index_is_the_nearest_bucket_and_monotone(h1, w1, h2, w2):
    i = release_ratio_index(h1, w1)
    gaps = [abs(h / w - h1 / w1) for h, w in BUCKETS]
    assert gaps[i] == min(gaps) and gaps.index(min(gaps)) == i  # nearest, first on a tie
    if h1 / w1 <= h2 / w2:
        assert i <= release_ratio_index(h2, w2)


def test_sequence_takes_the_ratio_token_of_its_size():
    vocab = _tiny_vocab() | {"<img_ratio_16>": 40, "<img_ratio_11>": 41}
    builder = SequenceBuilder(vocab, 0)
    assert builder([[10]], (4, 4), "")["input_ids"][0, 4].item() == 40
    assert builder([[10]], (4, 8), "")["input_ids"][0, 4].item() == 41
    del vocab["<img_ratio_32>"]
    with pytest.raises(ValueError, match=r"latent_size \(8, 2\) needs the token <img_ratio_32>"):
        SequenceBuilder(vocab, 0)([[10]], (8, 2), "")


def test_teacher_matches_direct_call_and_cfg():
    model = tiny()
    z, _, t, cond = batch(negative=True)
    v = Teacher(model, FAMILY)(
        z, t, input_ids=cond["input_ids"], valid_lengths=cond["valid_lengths"]
    )
    ref = direct(model, z, t, cond["input_ids"], cond["valid_lengths"])
    assert torch.equal(v, ref) and v.dtype == F64
    guided = Teacher(model, FAMILY, true_cfg_scale=5.0)(z, t, **cond)
    neg = direct(model, z, t, cond["negative_input_ids"], cond["negative_valid_lengths"])
    torch.testing.assert_close(guided, neg + 5.0 * (ref - neg), rtol=0, atol=1e-12)


def test_input_errors():
    model = tiny()
    z, r, t, cond = batch()
    teacher = Teacher(model, FAMILY)
    with pytest.raises(TypeError, match="HunyuanImage3ForCausalMM"):
        Teacher(torch.nn.Linear(2, 2), FAMILY)
    with pytest.raises(ValueError, match="latents"):
        teacher(torch.randn(2, 3, 4, 4, dtype=F64), t, **cond)
    with pytest.raises(ValueError, match="<img> tokens"):
        teacher(torch.randn(2, 4, 4, 6, dtype=F64), t, **cond)
    with pytest.raises(ValueError, match="input_ids"):
        teacher(z, t, input_ids=cond["input_ids"].double())
    with pytest.raises(TypeError, match="input_ids"):
        teacher(z, t)
    with pytest.raises(ValueError, match="negative_input_ids"):
        Teacher(model, FAMILY, true_cfg_scale=2.0)(z, t, **cond)
    with pytest.raises(TypeError, match="prompt_embeds"):
        teacher(z, t, **cond, prompt_embeds=z)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_student_equals_teacher_at_init(seed):
    model = tiny(seed=seed % 7)
    student = HunyuanImage3Student(model, lora=LoraSpec(rank=4))
    z, r, t, cond = batch(seed=seed)
    u = student(z, r, t, **cond)
    assert torch.equal(u, student.teacher()(z, t, **cond))
    assert torch.equal(u, direct(model, z, t, cond["input_ids"], cond["valid_lengths"]))


def test_lora_on_attention_and_shared_expert_only():
    model = tiny()
    HunyuanImage3Student(model, lora=LoraSpec(rank=2))
    hit = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert len(hit) == 2 * 4
    assert all(n.endswith(("qkv_proj", "o_proj", "gate_and_up_proj", "down_proj")) for n in hit)
    assert not any(".mlp.experts" in n or ".mlp.gate" in n for n in hit)


def test_trained_student_and_interval_hooks():
    model = tiny()
    z, r, t, cond = batch()
    ref = direct(model, z, t, cond["input_ids"], cond["valid_lengths"])
    student = HunyuanImage3Student(model, lora=LoraSpec(rank=4))
    perturb(student)
    u = student(z, r, t, **cond)
    assert not torch.allclose(u, ref)
    assert torch.equal(student.teacher()(z, t, **cond), ref)
    lora_only = direct(model, z, t, cond["input_ids"], cond["valid_lengths"])
    torch.testing.assert_close(student(z, t, t, **cond), lora_only, rtol=0, atol=1e-12)
    assert not torch.allclose(student(z, 0.5 * t, t, **cond), u)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_dudt_func_and_autograd_agree(seed):
    student = HunyuanImage3Student(tiny(), lora=LoraSpec(rank=2))
    perturb(student, seed=seed)
    z, _, t, cond = batch(seed=seed)
    t = 0.2 + 0.6 * t
    r = 0.5 * t
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    out = {}
    for method in ("func", "autograd"):
        student.attention = attention_mode_for(method)
        out[method] = total_derivative(student, z, r, t, v, method=method, cond=cond)[1]
    scale = out["func"].abs().max()
    assert scale > 0
    # the router's softmax and the expert sums run in fp32 inside NeMo even on fp64 weights
    torch.testing.assert_close(out["autograd"], out["func"], rtol=0, atol=1e-6 * scale)


def test_tangent_rules_change_no_value_on_hunyuanimage3():
    """Issue 21: the explicit tangent rules leave the one-forward step unchanged; NeMo runs
    its router and expert sums in fp32 even on fp64 weights, hence the fp32 tolerance."""
    student = HunyuanImage3Student(tiny(), lora=LoraSpec(rank=2))
    perturb(student, seed=4)
    z, _, t, cond = batch(seed=4)
    t = 0.2 + 0.6 * t
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    student.attention = attention_mode_for("func")
    assert_rules_change_nothing(student, z, 0.5 * t, t, v, cond, rtol=1e-6)


def test_save_load_round_trip_and_peft_reads_the_lora(tmp_path):
    model = tiny()
    base = {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items()}
    student = HunyuanImage3Student(model, lora=LoraSpec(rank=4, alpha=8.0))
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
    fresh = tiny(seed=3)
    fresh.load_state_dict(base)
    assert torch.equal(load_student(fresh, tmp_path, FAMILY)(z, r, t, **cond), u)
    # the LoRA file is plain peft: a stock model with the adapter injected reads it
    plain = tiny(seed=4)
    plain.load_state_dict(base)
    with safe_open(str(tmp_path / LORA_WEIGHT_NAME), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    config = LoraConfig(r=4, lora_alpha=8.0, target_modules=list(student.lora_spec.target_modules))
    inject_adapter_in_model(config, plain, "default")
    set_peft_model_state_dict(plain, state, adapter_name="default")
    got = direct(plain, z, t, cond["input_ids"], cond["valid_lengths"])
    torch.testing.assert_close(got, student(z, t, t, **cond), rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_generation_follows_meanflow_steps_and_decodes(steps):
    student = HunyuanImage3Student(tiny(dtype=torch.float32), lora=LoraSpec(rank=2))
    perturb(student)
    _, _, _, cond = batch()
    z0 = generate_latents(student, cond, height=4, width=4, steps=steps, seed=5)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    s = torch.linspace(1, 0, steps + 1)
    grid = 3.0 * s / (1 + 2.0 * s)  # the release's flow_shift 3
    with torch.no_grad():
        for t_, r_ in zip(grid[:-1], grid[1:], strict=True):
            z = z - (t_ - r_) * student(z, r_.expand(2), t_.expand(2), **cond)
    torch.testing.assert_close(z0, z, rtol=0, atol=1e-6)
    # the release's VAE is remote code; a diffusers AutoencoderKL with 4 latent channels
    # stands in to check the decode path
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(4, 8), latent_channels=4, norm_num_groups=1, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )  # fmt: skip
    images = decode_latents(vae, z0)
    assert len(images) == 2 and all(isinstance(im, PIL.Image.Image) for im in images)


def test_trainable_fraction_at_the_release_config_on_meta():
    backend = BackendConfig(**BACKEND, enable_hf_state_dict_adapter=False)
    counts = meta_counts(
        lambda: HunyuanImage3ForCausalMM(HunyuanImage3Config(), backend=backend),
        FAMILY,
        LoraSpec(rank=64),
    )
    assert 81.0e9 < counts["base"] < 81.6e9  # 81.30B total (13.65B active per token)
    assert 0.0008 < counts["fraction"] < 0.0012  # 73.4M LoRA + the interval MLP
