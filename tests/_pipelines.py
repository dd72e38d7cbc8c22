"""Tiny diffusers checkpoints of the families, built here with random text encoders,
tokenizers and VAEs (no downloads): FLUX (CLIP, T5), HunyuanImage 2.1 (Qwen2.5-VL, ByT5),
HunyuanImage 3.0 (token ids), Stable Diffusion 3 (two CLIPs with projections, T5).
Module-scoped fixtures for ``prepare`` and ``generate``."""

from __future__ import annotations

import json
import string

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLHunyuanImage,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    HunyuanImagePipeline,
    StableDiffusion3Pipeline,
)
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    T5Config,
    T5EncoderModel,
)

from mfcore.adapters.family import get_family
from mfcore.adapters.hunyuanimage3 import TINY_HY3_CONFIG, TINY_TOKENS

PROMPTS = ["a red cat", 'a shop sign that says "open"', "two birds"]


def char_tokenizer(max_len: int, extra=()) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (every printable character is a token)."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "</s>": 2, "<s>": 3}
    for token in (*extra, *string.printable):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(
        Regex("|".join(map(_escape, extra)) + "|."), "isolated"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>",
        bos_token="<s>", model_max_length=max_len,
    )  # fmt: skip


def _escape(s: str) -> str:
    return "".join("\\" + c if not c.isalnum() else c for c in s)


def t5(d_model: int) -> T5EncoderModel:
    config = T5Config(vocab_size=128, d_model=d_model, d_ff=16, d_kv=4, num_layers=1, num_heads=2)
    return T5EncoderModel(config).eval()  # eval: no dropout, as from_pretrained gives


def tiny_flux_pipeline(levels: int = 2) -> FluxPipeline:
    """A FLUX pipeline of tiny random parts; its VAE downsamples ``2 ** (levels - 1)`` times
    (FLUX.1's real one: 8, ``levels=4``)."""
    torch.manual_seed(0)
    clip = CLIPTextModel(
        CLIPTextConfig(vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=77, eos_token_id=2)
    ).eval()  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(4, *(8,) * (levels - 1)), latent_channels=1, norm_num_groups=1,
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, shift_factor=0.1, scaling_factor=1.5,
    )  # fmt: skip
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
        tokenizer=char_tokenizer(77), text_encoder_2=t5(32), tokenizer_2=char_tokenizer(512),
        transformer=get_family("flux").tiny_model(0, torch.float32, False),
    )  # fmt: skip


@pytest.fixture(scope="module")
def flux_ckpt(tmp_path_factory):
    pipe = tiny_flux_pipeline()
    path = tmp_path_factory.mktemp("flux")
    pipe.save_pretrained(path)
    return path, pipe


def tiny_hy21_pipeline() -> HunyuanImagePipeline:
    """A HunyuanImage 2.1 pipeline of tiny random parts (Qwen2.5-VL, ByT5, a VAE of factor 8)."""
    torch.manual_seed(0)
    text = dict(vocab_size=128, hidden_size=24, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1,
                rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]})  # fmt: skip
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=24)
    qwen = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    ).eval()
    vae = AutoencoderKLHunyuanImage(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64, 64),
        layers_per_block=1, scaling_factor=0.476986, spatial_compression_ratio=8, sample_size=128,
    )  # fmt: skip
    return HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), vae=vae, text_encoder=qwen,
        tokenizer=char_tokenizer(1000, ["<|im_start|>", "<|im_end|>"]),
        text_encoder_2=t5(12), tokenizer_2=char_tokenizer(128),
        transformer=get_family("hunyuanimage2").tiny_model(0, torch.float32, False),
    )  # fmt: skip


@pytest.fixture(scope="module")
def hy21_ckpt(tmp_path_factory):
    pipe = tiny_hy21_pipeline()
    path = tmp_path_factory.mktemp("hy21")
    pipe.save_pretrained(path)
    return path, pipe


def tiny_sd3_pipeline() -> StableDiffusion3Pipeline:
    """An SD3 pipeline of tiny random parts: two CLIPs of width 8 with 4-wide projections
    (pooled 8), a T5 of width 16 (the joint width), a VAE of factor 2, shift 3."""
    torch.manual_seed(0)

    def clip() -> CLIPTextModelWithProjection:
        config = CLIPTextConfig(
            vocab_size=128,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=4,
            eos_token_id=2,
            bos_token_id=3,
        )
        return CLIPTextModelWithProjection(config).eval()  # fmt: skip

    vae = AutoencoderKL(
        block_out_channels=(4, 8), latent_channels=4, norm_num_groups=1, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        shift_factor=0.0609, scaling_factor=1.5305,
    )  # fmt: skip
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=clip(),
        tokenizer=char_tokenizer(77), text_encoder_2=clip(), tokenizer_2=char_tokenizer(77),
        text_encoder_3=t5(16), tokenizer_3=char_tokenizer(256),
        transformer=get_family("sd3").tiny_model(0, torch.float32, False),
    )  # fmt: skip


@pytest.fixture(scope="module")
def sd3_ckpt(tmp_path_factory):
    pipe = tiny_sd3_pipeline()
    path = tmp_path_factory.mktemp("sd3")
    pipe.save_pretrained(path)
    return path, pipe


@pytest.fixture(scope="module")
def hy3_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("hy3")
    model = get_family("hunyuanimage3").tiny_model(0, torch.float32, False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(path / "model.safetensors"))  # fmt: skip
    config = {**TINY_HY3_CONFIG, "model_type": "hunyuan_image_3_moe", "image_base_size": 1024}
    (path / "config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"flow_shift": 3.0}))
    cfg = TINY_HY3_CONFIG
    names = {cfg["pad_token_id"]: "[PAD]", cfg["bos_token_id"]: "<s>", 5: "<timestep>", 6: "<img>",
             7: "<eoi>", 4: "<img_ratio_16>",
             **{TINY_TOKENS[k]: k for k in ("<boi>", "<img_size_1024>", "<cfg>")}}  # fmt: skip
    vocab = {names.get(i, f"[x{i}]"): i for i in range(10)}
    vocab |= {c: 10 + i for i, c in enumerate(string.ascii_lowercase + " ")}
    vocab["<img_ratio_11>"] = 40  # 1:2 wide; the square's <img_ratio_16> is 4
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[x9]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="<s>", unk_token="[x9]"
    ).save_pretrained(path)
    return path, model


def prompt_file(tmp_path, lines=PROMPTS):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n\n")
    return str(path)
