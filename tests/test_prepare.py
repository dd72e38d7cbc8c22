"""``mfcore-distill prepare`` with tiny random text encoders, tokenizers and VAEs built here
(no downloads, :mod:`tests._pipelines`): FLUX (CLIP, T5), HunyuanImage 2.1 (Qwen2.5-VL,
ByT5), HunyuanImage 3.0 (ids)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from mfcore.adapters.data import LatentDataset
from mfcore.adapters.distill import main
from mfcore.adapters.family import get_family
from mfcore.adapters.generation import seeded_noise
from mfcore.adapters.prepare import prepare
from mfcore.adapters.student import Teacher
from mfcore.solvers import sample_teacher
from tests._pipelines import PROMPTS, flux_ckpt, hy3_ckpt, hy21_ckpt, prompt_file

__all__ = ["flux_ckpt", "hy21_ckpt", "hy3_ckpt"]  # the fixtures this module uses


def test_flux_from_teacher_samples(tmp_path, flux_ckpt):
    path, pipe = flux_ckpt
    out = tmp_path / "data"
    prepare(str(path), prompt_file(tmp_path), str(out), height=8, width=8, per_file=2,
            teacher_steps=3, dtype="fp32", seed=4)  # fmt: skip
    data = LatentDataset(out, get_family("flux"))
    assert len(data) == 3 and len(data.files) == 2
    model = pipe.transformer
    data.check_transformer(model)
    x, cond = data.batch(0, 3, 0, "cpu")
    order = data.indices(0, 3, 0)
    pe_all, pooled_all, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=512)
    # the pipeline's encoding (a loaded encoder may pick another attention kernel: rounding)
    torch.testing.assert_close(cond["prompt_embeds"], pe_all[order], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        cond["pooled_prompt_embeds"], pooled_all[order], rtol=1e-4, atol=1e-4
    )
    # the latents are the teacher's samples from the seeded noise, prompt by prompt
    fam = get_family("flux")
    teacher = Teacher(model, fam, guidance_scale=3.5)
    back = torch.tensor(order).argsort()
    noise = seeded_noise((3, 1, 4, 4), 4, "cpu", torch.float32)
    cond_all = {k: v[back] for k, v in cond.items()}
    ref = sample_teacher(teacher, noise, 3, grid=fam.sampling_grid(3, 4, 4), cond=cond_all)
    torch.testing.assert_close(x, ref[order], rtol=0, atol=1e-6)


def test_flux_from_images_and_errors(tmp_path, flux_ckpt, capsys):
    path, pipe = flux_ckpt
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        array = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        PIL.Image.fromarray(array).save(images / f"{i}.png")
    out = tmp_path / "data"
    prompts = prompt_file(tmp_path)
    prepare(str(path), prompts, str(out), images=str(images), height=8, width=8, dtype="fp32")
    x, _ = LatentDataset(out).batch(0, 3, 0, "cpu")
    pixels = torch.from_numpy(np.asarray(PIL.Image.open(images / "0.png"), np.float32) / 127.5 - 1)
    with torch.no_grad():
        dist = pipe.vae.encode(pixels.permute(2, 0, 1)[None]).latent_dist
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(0))
    first = x[LatentDataset(out).indices(0, 3, 0).index(0)]
    # a VAE sample of the first image, normalised as FLUX's pipeline: (z - shift) * scale
    torch.testing.assert_close(first, ((dist.mean + dist.std * noise)[0] - 0.1) * 1.5)
    argv = ["prepare", "--model", str(path), "--output", str(tmp_path / "e"), "--dtype", "fp32"]
    (tmp_path / "x").mkdir()
    empty = prompt_file(tmp_path / "x", [""])
    err = _usage_error([*argv, "--prompts", empty], capsys)
    assert "holds no prompt" in err
    long = prompt_file(tmp_path, ["a" * 600])
    assert "prompt 1 is too long" in _usage_error([*argv, "--prompts", long], capsys)
    few = prompt_file(tmp_path, PROMPTS + ["one more"])
    err = _usage_error([*argv, "--prompts", few, "--images", str(images), "--height", "8",
                        "--width", "8"], capsys)  # fmt: skip
    assert "3 images for 4 prompts" in err
    err = _usage_error([*argv, "--prompts", prompts, "--height", "7"], capsys)
    assert "height" in err


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_hunyuanimage2_with_glyph_text_and_a_run(tmp_path, hy21_ckpt):
    path, pipe = hy21_ckpt
    out = tmp_path / "data"
    argv = ["prepare", "--model", str(path), "--prompts", prompt_file(tmp_path), "--output",
            str(out), "--height", "32", "--width", "32", "--teacher-steps", "2", "--dtype",
            "fp32", "--true-cfg-scale", "2", "--negative-prompt", "blurry"]  # fmt: skip
    assert main(argv) == 0
    data = LatentDataset(out, get_family("hunyuanimage2"))
    assert data.shapes["latents"] == (4, 4, 4)
    assert data.shapes["prompt_embeds"] == (1000, 24) and "negative_prompt_embeds" in data.shapes
    files = [f for f in data.files]
    glyph = [int(m.sum()) for f in files for m in _load(f)["prompt_attention_mask_2"]]
    assert sorted(glyph)[:2] == [0, 0] and sorted(glyph)[2] > 0  # only the quoted prompt
    run = ["train", "--tiny", "--family", "hunyuanimage2", "--data", str(out), "--output",
           str(tmp_path / "run"), "--steps", "1", "--device", "cpu", "--weights-dtype", "fp32",
           "--no-progress", "--lora-rank", "2", "--true-cfg-scale", "2"]  # fmt: skip
    assert main(run) == 0


def _load(path):
    from safetensors.torch import load_file

    return load_file(path)


def test_hunyuanimage3_token_ids(tmp_path, hy3_ckpt):
    path, model = hy3_ckpt
    out = tmp_path / "data"
    prepare(str(path), prompt_file(tmp_path, ["a cat", "two dogs"]), str(out), height=64,
            width=64, teacher_steps=2, true_cfg_scale=3.0, dtype="fp32")  # fmt: skip
    data = _load(str(out / "samples-00000.safetensors"))
    ids, lengths = data["input_ids"], data["valid_lengths"]
    assert lengths.tolist() == [1 + 5 + 4 + 16 + 1, 1 + 8 + 4 + 16 + 1]
    assert ids[0, : 1 + 5].tolist() == [1, 10, 36, 12, 10, 29]  # <s> "a cat"
    assert ids[0, 6:10].tolist() == [2, 3, 4, 5] and (ids == 6).sum(1).tolist() == [16, 16]
    assert data["negative_input_ids"][0, 1:6].tolist() == [8] * 5
    assert data["latents"].shape == (2, 4, 4, 4) and torch.isfinite(data["latents"]).all()
    # the ratio token is the size's bucket: 1:2 wide is <img_ratio_11>; 2:1 tall needs
    # <img_ratio_21>, which this tokenizer lacks
    prepare(str(path), prompt_file(tmp_path, ["a cat"]), str(tmp_path / "wide"), height=64,
            width=128, teacher_steps=1, dtype="fp32")  # fmt: skip
    wide = _load(str(tmp_path / "wide" / "samples-00000.safetensors"))
    assert wide["input_ids"][0, 6:10].tolist() == [2, 3, 40, 5]
    assert wide["latents"].shape[-2:] == (4, 8)
    with pytest.raises(ValueError, match="<img_ratio_21>"):
        prepare(str(path), prompt_file(tmp_path, ["a cat"]), str(tmp_path / "tall"), height=128,
                width=64, teacher_steps=1, dtype="fp32")  # fmt: skip
    too_long = prompt_file(tmp_path, ["a" * 22800])
    with pytest.raises(ValueError, match="too long"):
        prepare(str(path), too_long, str(tmp_path / "e"), height=64, width=64, dtype="fp32")
