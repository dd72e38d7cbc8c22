"""``mfcore-distill prepare`` with tiny random text encoders, tokenizers and VAEs built here
(no downloads, :mod:`tests._pipelines`): FLUX (CLIP, T5), HunyuanImage 2.1 (Qwen2.5-VL,
ByT5), HunyuanImage 3.0 (ids)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mfcore.adapters.data import LatentDataset, make_synthetic_data
from mfcore.adapters.distill import latest_checkpoint
from mfcore.adapters.distill_cli import main
from mfcore.adapters.family import get_family
from mfcore.adapters.generation import seeded_noise
from mfcore.adapters.loading import resolve_model
from mfcore.adapters.prepare import fit_image, prepare, read_image_folder
from mfcore.adapters.student import Teacher
from mfcore.solvers import sample_teacher
from tests._cli import usage_error
from tests._close import FP32, assert_close_to, max_rel
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
    err = usage_error([*argv, "--prompts", empty], capsys)
    assert "holds no prompt" in err
    long = prompt_file(tmp_path, ["a" * 600])
    assert "prompt 1 is too long" in usage_error([*argv, "--prompts", long], capsys)
    few = prompt_file(tmp_path, PROMPTS + ["one more"])
    err = usage_error([*argv, "--prompts", few, "--images", str(images), "--height", "8",
                        "--width", "8"], capsys)  # fmt: skip
    assert "3 images for 4 prompts" in err
    err = usage_error([*argv, "--prompts", prompts, "--height", "7"], capsys)
    assert "height" in err


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


def test_the_teacher_samples_with_apg_when_asked(tmp_path, hy21_ckpt, capsys):
    """--teacher-guidance apg: the latents are the APG teacher's samples (Teacher(rule="apg"),
    the same noise, grid and conditions), not plain CFG's; a bad rule is a usage error."""
    path, _ = hy21_ckpt
    argv = ["prepare", "--model", str(path), "--prompts", prompt_file(tmp_path, PROMPTS[:2]),
            "--height", "32", "--width", "32", "--teacher-steps", "2", "--dtype", "fp32",
            "--true-cfg-scale", "40", "--negative-prompt", "blurry"]  # fmt: skip
    fam = get_family("hunyuanimage2")
    got = {}
    for rule in ("cfg", "apg"):
        out = tmp_path / rule
        assert main([*argv, "--output", str(out), "--teacher-guidance", rule,
                     "--apg-norm-threshold", "0.01"]) == 0  # fmt: skip
        got[rule] = _load(str(out / "samples-00000.safetensors"))
    x, cond = LatentDataset(tmp_path / "apg", fam).take([0, 1], "cpu")
    model, _ = fam.load_model(str(path), torch.float32)
    teacher = Teacher(model, fam, true_cfg_scale=40.0, rule="apg", apg_norm_threshold=0.01)
    noise = seeded_noise((2, 4, 4, 4), 0, "cpu", torch.float32)
    with torch.no_grad():
        ref = sample_teacher(teacher, noise, 2, grid=fam.sampling_grid(2, 4, 4), cond=cond)
    assert_close_to(x, ref, FP32, "apg teacher")
    assert max_rel(got["cfg"]["latents"], x) > 10 * FP32  # (3e-3 measured)
    err = usage_error([*argv, "--output", str(tmp_path / "x"), "--teacher-guidance", "pag"],
                      capsys)  # fmt: skip
    assert "invalid choice" in err


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


def _image(path, size, seed=0):
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_image_folder_captions_in_diffusers_convention(tmp_path):
    """metadata.jsonl (file_name + a caption column) or a .txt beside each image; sorted by
    file name; a missing caption or a bad line is an error naming it."""
    meta = tmp_path / "meta"
    meta.mkdir()
    for name in ("b.png", "a.png"):
        _image(meta / name, (8, 8))
    lines = [{"file_name": "b.png", "caption": "a bee"}, {"file_name": "a.png", "caption": "ant"}]
    (meta / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    files, captions = read_image_folder(meta, caption_column="caption")
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.png", "b.png"]
    assert captions == ["ant", "a bee"]
    with pytest.raises(ValueError, match="line 1 .*'text'"):
        read_image_folder(meta)  # the default column is "text"
    txt = tmp_path / "txt"
    txt.mkdir()
    _image(txt / "cat.jpg", (8, 8))
    (txt / "cat.txt").write_text("a cat\n")
    assert read_image_folder(txt)[1] == ["a cat"]
    _image(txt / "dog.png", (8, 8))
    with pytest.raises(ValueError, match=r"\['dog.png'\] .* have no caption"):
        read_image_folder(txt)
    (meta / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}))
    with pytest.raises(FileNotFoundError, match="gone.png"):
        read_image_folder(meta)


@settings(max_examples=30, deadline=None)
@given(w=st.integers(8, 40), h=st.integers(8, 40), tw=st.integers(4, 24), th=st.integers(4, 24))
def test_fit_image_never_stretches(w, h, tw, th):
    """The fitted image is the target size and matches PIL's own ``ImageOps.fit`` (crop the
    centre to the target's aspect ratio, then resize) to resampling error on a smooth
    image; a stretched resize is further off whenever the aspect ratios differ enough."""
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    rgb = np.stack([x * 255, y * 255, (x * y) * 255], -1).astype(np.uint8)
    image = PIL.Image.fromarray(rgb)
    fitted, cropped = fit_image(image, tw, th)
    assert fitted.size == (tw, th)
    ref = PIL.ImageOps.fit(image, (tw, th), PIL.Image.BICUBIC, centering=(0.5, 0.5))
    err = np.abs(np.asarray(fitted, float) - np.asarray(ref, float)).mean()
    # of 255: both resample a smooth gradient, in another order, and may round the crop's
    # offset to neighbouring pixels: up to a target pixel's step of the gradient
    assert err < 255 / min(tw, th), err
    stretched = np.asarray(image.resize((tw, th), PIL.Image.BICUBIC), float)
    if abs(w / h - tw / th) > 0.5 * (w / h):
        assert cropped
        assert np.abs(np.asarray(fitted, float) - stretched).mean() > err
    assert fit_image(PIL.Image.new("RGB", (2 * tw, 2 * th)), tw, th)[1] is False


def test_prepare_from_captioned_images_crops_and_keeps_the_dtype(tmp_path, flux_ckpt, capsys):
    """prepare --images without --prompts: the captions are the prompts; a 24x20 image is
    resized to 19x16 and centre-cropped to 16x16 (not stretched); conditions in bf16."""
    path, pipe = flux_ckpt
    images = tmp_path / "images"
    images.mkdir()
    _image(images / "wide.png", (24, 20), seed=1)
    (images / "wide.txt").write_text("a red cat")
    _image(images / "square.png", (16, 16), seed=2)
    (images / "square.txt").write_text("two birds")
    out = tmp_path / "data"
    argv = ["prepare", "--model", str(path), "--images", str(images), "--output", str(out),
            "--height", "16", "--width", "16", "--dtype", "bf16"]  # fmt: skip
    assert main(argv) == 0
    line = capsys.readouterr().out
    assert "wrote 2 samples (FLUX, latents 1 x 8 x 8, conditions in bf16)" in line
    stored = _load(str(out / "samples-00000.safetensors"))
    assert stored["prompt_embeds"].dtype == torch.bfloat16
    assert stored["latents"].dtype == torch.float32
    pe, _, _ = pipe.encode_prompt(["two birds", "a red cat"], None, max_sequence_length=512)
    # sorted by file name: square, wide; the encoders ran in bf16 (8-bit mantissa)
    assert max_rel(stored["prompt_embeds"].float(), pe) < 2e-2
    # the wide image's latents are the VAE's of its fitted (cropped, unstretched) pixels
    fitted, cropped = fit_image(PIL.Image.open(images / "wide.png").convert("RGB"), 16, 16)
    assert cropped
    stretched = PIL.Image.open(images / "wide.png").convert("RGB").resize((16, 16))
    assert np.abs(np.asarray(fitted, float) - np.asarray(stretched, float)).mean() > 1
    x = torch.from_numpy(np.asarray(fitted, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        mean = pipe.vae.encode(x.to(pipe.vae.dtype)).latent_dist.mean
    ref = (mean.float() - 0.1) * 1.5
    # (the stored latents are a VAE sample around this mean; its std is tiny here or not,
    # so compare the sample's distance to this mean against the stretched image's)
    with torch.no_grad():
        xs = torch.from_numpy(np.asarray(stretched, np.float32) / 127.5 - 1).permute(2, 0, 1)
        other = (pipe.vae.encode(xs[None]).latent_dist.mean.float() - 0.1) * 1.5
    got = stored["latents"][1:2]
    assert (got - ref).abs().mean() < (got - other).abs().mean()


def test_model_ids_come_from_the_local_hugging_face_cache(tmp_path, flux_ckpt, capsys, monkeypatch):
    """--model ORG/NAME: the snapshot in the local cache, else a usage error saying how to
    get it; nothing is downloaded."""
    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("abc123")
    assert resolve_model("org/tiny", cache_dir=str(cache)) == str(snap)
    with pytest.raises(FileNotFoundError, match="hf download org/other"):
        resolve_model("org/other", cache_dir=str(cache))
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    # train and its resume, from an id in the (default) cache, as the CLI gives it
    import huggingface_hub.constants

    path, _ = flux_ckpt
    shutil.copytree(path, snap, dirs_exist_ok=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    data = tmp_path / "data"
    make_synthetic_data(str(data), family="flux", num_files=1, per_file=2, height=4, width=4)
    train = ["train", "--model", "org/tiny", "--data", str(data), "--output", str(tmp_path / "r"),
             "--device", "cpu", "--weights-dtype", "fp32", "--lora-rank", "2", "--no-progress",
             "--preview-every", "0"]  # fmt: skip
    assert main([*train, "--steps", "1"]) == 0
    assert main([*train, "--steps", "2", "--resume"]) == 0
    assert latest_checkpoint(tmp_path / "r").endswith("step-0000002")
    err = usage_error(["prepare", "--model", str(tmp_path / "nope"), "--prompts", "p",
                        "--output", str(tmp_path / "o")], capsys)  # fmt: skip
    assert "nope does not exist" in err
