"""``mfcore-distill generate`` and :class:`MeanFlowPipeline`: prompt (or data) to image with a
trained student, for every family, on tiny models and tiny checkpoints built here."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from mfcore.adapters.data import LatentDataset
from mfcore.adapters.distill_cli import main
from mfcore.adapters.family import get_family
from mfcore.adapters.generation import seeded_noise
from mfcore.adapters.lora import LoraSpec
from mfcore.adapters.pipeline import MeanFlowPipeline
from mfcore.adapters.student import MeanFlowStudent, load_student
from mfcore.solvers import sample_meanflow
from tests._cli import usage_error
from tests._close import FP32, assert_close_to, max_rel
from tests._pipelines import flux_ckpt, hy3_ckpt, hy21_ckpt, tiny_flux_pipeline

__all__ = ["flux_ckpt", "hy21_ckpt", "hy3_ckpt"]  # the fixtures this module uses


def _tiny_run(tmp_path, family: str, *extra: str):
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["make-data", str(data), "--family", family]) == 0
    assert main(["train", "--tiny", "--family", family, "--data", str(data), "--output",
                 str(run), "--steps", "2", "--device", "cpu", "--weights-dtype", "fp32",
                 "--no-progress", "--lora-rank", "2", "--lr", "1e-2", "--seed", "3",
                 "--checkpoint-every", "2", *extra]) == 0  # fmt: skip
    return data, run


@pytest.mark.parametrize(
    ("family", "extra"),
    [("flux", ()), ("hunyuanimage2", ()), ("hunyuanimage3", ()), ("sd3", ()),
     ("hunyuanimage2", ("--r-embedding", "native"))],
    ids=["flux", "hunyuanimage2", "hunyuanimage3", "sd3", "hunyuanimage2-native"],
)  # fmt: skip
def test_generate_from_a_tiny_run_equals_the_student_on_the_data(tmp_path, family, extra, capsys):
    """make-data, train --tiny, generate: PNGs per sample and step count, whose latents are
    the saved student's MeanFlow steps from the seeded noise on the run's own tiny model;
    the run folder, its student/ and its checkpoint (EMA weights) give the same images."""
    data, run = _tiny_run(tmp_path, family, *extra)
    out = tmp_path / "images"
    argv = ["generate", "--student", str(run), "--data", str(data), "--count", "3", "--steps",
            "1", "2", "--seed", "7", "--dtype", "fp32", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "wrote 6 images" in capsys.readouterr().out
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [f"{i:03d}-{k}step.png" for i in range(3) for k in (1, 2)]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["family"] == family and settings["decoded"] is False
    latents = load_file(str(out / "latents.safetensors"))

    fam = get_family(family)
    student = load_student(fam.tiny_model(3, torch.float32, False), run / "student", fam)
    assert student.r_embedding == (extra[-1] if extra else "interval")
    x, cond = LatentDataset(data, fam).take([0, 1, 2], "cpu")
    _, c, h, w = x.shape
    assert PIL.Image.open(out / "000-1step.png").size == (w, h)  # no VAE: a latent pixel each
    noise = seeded_noise((3, c, h, w), 7, "cpu", torch.float32)
    for k in (1, 2):
        grid = fam.sampling_grid(k, h, w, dtype=torch.float32)
        with torch.no_grad():
            ref = sample_meanflow(student, noise, k, grid=grid, cond=cond)
        assert_close_to(latents[f"{k}step"], ref, FP32, f"{k} steps")
    assert not torch.allclose(latents["1step"], latents["2step"], atol=1e-3)

    for source in (run / "student", run / "checkpoints" / "step-0000002"):
        again = tmp_path / source.name
        assert main([*argv[:2], str(source), *argv[3:-1], str(again)]) == 0
        other = load_file(str(again / "latents.safetensors"))
        for k in ("1step", "2step"):
            assert_close_to(other[k], latents[k], FP32, f"{source.name} {k}")


def test_a_tiny_run_takes_conditions_not_prompts(tmp_path, capsys):
    data, run = _tiny_run(tmp_path, "flux")
    argv = ["generate", "--student", str(run), "--output", str(tmp_path / "o")]
    assert "no text encoders" in usage_error([*argv, "--prompt", "a cat"], capsys)
    assert "one of the arguments" in usage_error(argv, capsys)
    assert "does not exist" in usage_error(
        ["generate", "--student", str(tmp_path / "nothing"), "--data", str(data), "--output",
         str(tmp_path / "o")], capsys)  # fmt: skip
    # a student folder moved away from its run has no settings: it needs --model
    alone = tmp_path / "alone"
    (run / "student").rename(alone)
    err = usage_error(["generate", "--student", str(alone), "--data", str(data), "--output",
                        str(tmp_path / "o")], capsys)  # fmt: skip
    assert "give --model" in err
    err = usage_error([*argv, "--data", str(data), "--steps", "0"], capsys)
    assert "steps" in err
    assert "device" in usage_error([*argv, "--data", str(data), "--device", "bogus"], capsys)
    # the run folder without its student/ (not exported yet): its newest checkpoint, whose
    # EMA weights are what the export was; a step count given twice is made once
    out = tmp_path / "from-checkpoint"
    assert main([*argv[:3], "--data", str(data), "--count", "1", "--steps", "1", "1",
                 "--output", str(out)]) == 0  # fmt: skip
    assert sorted(p.name for p in out.glob("*.png")) == ["000-1step.png"]
    assert json.loads((out / "settings.json").read_text())["dtype"] == "fp32"  # the run's


def _saved_student(tmp_path, path, family: str) -> tuple[str, MeanFlowStudent]:
    """A student of the checkpoint at ``path`` with random (non-zero) LoRA and interval
    weights, saved to a folder of its own."""
    fam = get_family(family)
    transformer, _ = fam.load_model(str(path), torch.float32)
    student = MeanFlowStudent(transformer, fam, lora=LoraSpec(rank=2))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    folder = str(tmp_path / f"{family}-student")
    student.save_pretrained(folder)
    return folder, student.eval()


def test_flux_prompt_to_image_matches_diffusers_pieces(tmp_path, flux_ckpt, capsys):
    """From prompts: diffusers' own FluxPipeline.encode_prompt, the student's MeanFlow steps
    from the seeded noise on FLUX's grid, and diffusers' VAE decode and post-processing."""
    path, pipe = flux_ckpt
    folder, student = _saved_student(tmp_path, path, "flux")
    prompts = ["a red cat", "two birds"]
    mf = MeanFlowPipeline.from_pretrained(path, student=folder, torch_dtype=torch.float32)
    assert mf.decoded and mf.vae_scale_factor == 2
    result = mf(prompts, num_inference_steps=2, height=16, width=16, seed=5, output_type="np")
    assert result.images.shape == (2, 16, 16, 3)

    pe, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=512)
    cond = {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}
    noise = seeded_noise((2, 1, 8, 8), 5, "cpu", torch.float32)
    grid = get_family("flux").sampling_grid(2, 8, 8, dtype=torch.float32)
    with torch.no_grad():
        z = sample_meanflow(student, noise, 2, grid=grid, cond=cond)
        image = pipe.vae.decode(z / pipe.vae.config.scaling_factor + 0.1, return_dict=False)[0]
    assert_close_to(result.latents, z, FP32, "latents")
    ref = pipe.image_processor.postprocess(image, output_type="np")
    np.testing.assert_allclose(result.images, ref, atol=1e-4)

    out = tmp_path / "cli"
    argv = ["generate", "--model", str(path), "--student", folder, "--prompt", prompts[0],
            "--prompt", prompts[1], "--steps", "2", "--seed", "5", "--height", "16", "--width",
            "16", "--dtype", "fp32", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert PIL.Image.open(out / "001-2step.png").size == (16, 16)
    assert_close_to(load_file(str(out / "latents.safetensors"))["2step"], z, FP32, "cli")
    assert "multiple of 4 pixels" in usage_error([*argv, "--height", "14"], capsys)  # 7 latents


def test_hunyuanimage_prompt_to_image(tmp_path, hy21_ckpt, hy3_ckpt):
    """HunyuanImage 2.1 decodes with its VAE; 3.0 (no VAE here, as the release's is remote
    code) gives latent previews and says so."""
    path, _ = hy21_ckpt
    folder, _ = _saved_student(tmp_path, path, "hunyuanimage2")
    mf = MeanFlowPipeline.from_pretrained(path, student=folder, torch_dtype=torch.float32)
    images = mf('a sign that says "open"', num_inference_steps=1, height=32, width=32).images
    assert len(images) == 1 and images[0].size == (32, 32)

    path3, _ = hy3_ckpt
    folder3, _ = _saved_student(tmp_path, path3, "hunyuanimage3")
    mf3 = MeanFlowPipeline.from_pretrained(path3, student=folder3, torch_dtype=torch.float32)
    assert not mf3.decoded and mf3.vae_scale_factor == 1
    out = mf3(["a cat", "two dogs"], num_inference_steps=2, height=4, width=4)
    assert [im.size for im in out.images] == [(4, 4), (4, 4)]
    assert out.latents.shape == (2, 4, 4, 4) and torch.isfinite(out.latents).all()


def test_pipeline_refuses_bad_calls(tmp_path, flux_ckpt):
    path, _ = flux_ckpt
    folder, _ = _saved_student(tmp_path, path, "flux")
    mf = MeanFlowPipeline.from_pretrained(path, student=folder, torch_dtype=torch.float32)
    with pytest.raises(ValueError, match="exactly one of prompt and cond"):
        mf()
    with pytest.raises(ValueError, match="output_type"):
        mf("a cat", height=16, width=16, output_type="jpeg")
    with pytest.raises(ValueError, match="prompt"):
        mf([""], height=16, width=16)
    with pytest.raises(ValueError, match="steps"):
        mf("a cat", height=16, width=16, num_inference_steps=0)
    with pytest.raises(TypeError, match="MeanFlowStudent"):
        MeanFlowPipeline(object())


def test_the_stock_flux_pipeline_loads_only_the_students_instantaneous_velocity(
    tmp_path, flux_ckpt
):
    """diffusers' FluxPipeline.load_lora_weights on a student folder takes the LoRA and not
    the interval embedding: its transformer is the student at r = t, not at r < t (the trap
    docs/flux.md warns of)."""
    path, _ = flux_ckpt
    folder, student = _saved_student(tmp_path, path, "flux")
    stock = tiny_flux_pipeline()
    stock.load_lora_weights(folder)
    fam = get_family("flux")
    g = torch.Generator().manual_seed(1)
    z, t = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([0.7, 0.4])
    cond = {"prompt_embeds": torch.randn(2, 5, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(2, 32, generator=g)}  # fmt: skip
    call = fam.call_inputs(stock.transformer, z, cond, student.guidance_scale, False)
    with torch.no_grad():
        v_stock = fam.velocity(stock.transformer, z, t, call.inputs)
        at_t, below = student(z, t, t, **cond), student(z, 0.5 * t, t, **cond)
    assert_close_to(v_stock, at_t, FP32, "r = t")
    assert max_rel(v_stock, below) > 1e-3
    card = (tmp_path / "flux-student" / "README.md").read_text()
    assert "load_lora_weights" in card and "r = t" in card


def test_validation_prompts_preview_the_teacher_and_the_student(tmp_path, flux_ckpt, capsys):
    """--validation-prompts: the previews' rows are the prompts, encoded by the checkpoint's
    own encoders, each with the teacher's sample and the student's 1-, 2- and 4-step ones;
    a tiny model (no encoders) and a missing file are usage errors."""
    path, _ = flux_ckpt
    data = tmp_path / "data"
    assert main(["make-data", str(data), "--family", "flux"]) == 0
    prompts = tmp_path / "val.txt"
    prompts.write_text("a red cat\ntwo birds\na blue house\n")
    argv = ["train", "--model", str(path), "--data", str(data), "--output", str(tmp_path / "r"),
            "--steps", "1", "--device", "cpu", "--weights-dtype", "fp32", "--lora-rank", "2",
            "--no-progress", "--preview-every", "1"]  # fmt: skip
    assert main([*argv, "--validation-prompts", str(prompts)]) == 0
    preview = PIL.Image.open(tmp_path / "r" / "previews" / "step-0000001.png")
    _, h, w = LatentDataset(data, get_family("flux")).shapes["latents"]
    factor = 2  # the tiny pipeline's VAE
    assert preview.size == (4 * w * factor, 3 * h * factor)  # 3 prompts x (teacher, 1, 2, 4)
    err = usage_error(["train", "--tiny", "--data", str(data), "--output", str(tmp_path / "t"),
                       "--validation-prompts", str(prompts)], capsys)  # fmt: skip
    assert "text encoders" in err
    err = usage_error([*argv, "--validation-prompts", str(tmp_path / "none.txt")], capsys)
    assert "none.txt does not exist" in err
