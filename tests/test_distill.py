"""``mfcore-distill`` for every family on tiny random models (CPU): the whole seed method,
exact resume after a kill, EMA, previews, named errors, and today's FLUX files loading."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import PIL.Image
import pytest
import torch
from diffusers import HunyuanImageTransformer2DModel
from safetensors.torch import load_file

import mfcore.adapters.distill as distill_module
from mfcore.adapters._state import load_state
from mfcore.adapters.data import LatentDataset, make_synthetic_data
from mfcore.adapters.distill import DistillConfig, distill, latest_checkpoint
from mfcore.adapters.distill_cli import HELP, build_parser, main
from mfcore.adapters.family import FAMILIES, get_family
from mfcore.adapters.flux import FluxStudent
from mfcore.adapters.hunyuanimage2 import TINY_HY21_CONFIG
from tests._cli import usage_error
from tests._close import FP32, FP64, assert_close_to, flat

LEGACY = os.path.join(os.path.dirname(__file__), "data", "flux_legacy")
GOLDEN = os.path.join(os.path.dirname(__file__), "data", "flux_golden.safetensors")


def config(tmp_path, family, name="run", **kw) -> DistillConfig:
    base = dict(
        data=str(tmp_path / f"data-{family}"),
        output=str(tmp_path / name),
        tiny=True,
        family=family,
        steps=4,
        switch="fixed",
        warmup_steps=1,
        signal_every=1,
        warmup_ode_steps=2,
        checkpoint_every=2,
        lora_rank=2,
        batch_size=2,
        device="cpu",
        weights_dtype="fp32",
        progress=False,
        lr=1e-3,
        align="fake",
        critic_lead=1,
        critic_rank=2,
        preview_every=0,
        report_to="none",
    )
    return DistillConfig(**(base | kw))


def data(tmp_path, family, **kw):
    folder = tmp_path / f"data-{family}"
    make_synthetic_data(folder, family=family, num_files=2, per_file=2, height=4, width=4,
                        seq_len=4, **kw)  # fmt: skip
    return folder


class Killed(Exception):
    pass


def _adapter(name: str) -> bool:
    """Whether a student parameter is trained: a LoRA weight, the interval embedding or
    (``r_embedding="native"``) the model's own e_r."""
    return ".lora_" in name or name.startswith("interval.") or "timestep_embedder_r" in name


@pytest.mark.parametrize(
    ("family", "r_embedding"),
    [*((f, "interval") for f in FAMILIES), ("hunyuanimage2", "native")],
)
def test_whole_run_trains_only_adapters_and_resumes_exactly_after_a_kill(
    tmp_path, family, r_embedding, monkeypatch
):
    data(tmp_path, family)
    fam = get_family(family)
    base = fam.tiny_model(0, torch.float32, False).state_dict()
    straight = distill(config(tmp_path, family, "a", r_embedding=r_embedding))
    # everything but the adapters (student LoRA, interval, the critic's LoRA) is the base
    trained = {"student": 0, "fake": 0}
    for name, p in straight.named_parameters():
        key = name.removeprefix("transformer.").replace(".base_layer", "")
        if _adapter(name):
            owner = "fake" if ".mfcore_fake." in name else "student"
            if "lora_B" in name:
                trained[owner] += int(bool(p.detach().abs().sum() > 0))
        else:  # frozen: the very values built in this process (bitwise is the contract)
            assert torch.equal(p, base[key]), name
    assert trained["student"] > 0 and trained["fake"] > 0
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["phase"] == "discrete" and any(r["phase"] == "differential" for r in rows)
    assert all("align_loss" in r for r in rows[1:])

    # the run is killed in step 3, after the checkpoint of step 2 ...
    honest = distill_module._train_step

    def dies_at_three(run):
        if run.step == 2:
            raise Killed
        return honest(run)

    monkeypatch.setattr(distill_module, "_train_step", dies_at_three)
    with pytest.raises(Killed):
        distill(config(tmp_path, family, "b", r_embedding=r_embedding))
    monkeypatch.setattr(distill_module, "_train_step", honest)
    # ... and resumed: bit-identical weights, EMA and critic (one process, one machine: a
    # resumed run equal to the uninterrupted one bit for bit is the checkpoints' contract)
    resumed = distill(config(tmp_path, family, "b", resume=True, r_embedding=r_embedding))
    a, b = dict(straight.named_parameters()), dict(resumed.named_parameters())
    assert sum(_adapter(k) and "timestep_embedder_r" in k for k in a) == 4 * (
        r_embedding == "native"
    )
    for k in a:
        if _adapter(k):
            assert torch.equal(a[k], b[k]), k
    ema = [load_state(os.path.join(latest_checkpoint(tmp_path / n), "state"))["ema"] for n in "ab"]
    assert all(torch.equal(x, y) for x, y in zip(ema[0]["shadow"], ema[1]["shadow"], strict=True))


def test_ema_is_checkpointed_and_exported(tmp_path):
    data(tmp_path, "flux")
    student = distill(config(tmp_path, "flux", steps=3, checkpoint_every=3))
    ckpt = latest_checkpoint(tmp_path / "run")
    state = load_state(os.path.join(ckpt, "state"))
    raw = load_file(os.path.join(ckpt, "student.safetensors"))
    exported = student.trainable_state_dict()
    assert state["ema"]["updates"] == 3
    assert [tuple(s.shape) for s in state["ema"]["shadow"]] == [
        tuple(p.shape) for p in student.trainable_parameters()
    ]
    assert any(not torch.equal(exported[k], raw[k]) for k in raw if "lora_B" in k)
    # the exported weights are the EMA's, copied (this process's values: no arithmetic)
    for s, p in zip(state["ema"]["shadow"], student.trainable_parameters(), strict=True):
        assert torch.equal(s, p.detach())


def test_tensorboard_and_preview_images(tmp_path):
    data(tmp_path, "hunyuanimage2")
    distill(
        config(tmp_path, "hunyuanimage2", align="none", preview_every=2, report_to="tensorboard")
    )
    previews = sorted(os.listdir(tmp_path / "run" / "previews"))
    assert previews == ["step-0000002.png", "step-0000004.png"]
    # two samples, as rows: the teacher, then the student at 1, 2 and 4 steps (no VAE: a
    # latent pixel each)
    _, h, w = LatentDataset(tmp_path / "data-hunyuanimage2", get_family("hunyuanimage2")).shapes[
        "latents"
    ]
    assert PIL.Image.open(tmp_path / "run" / "previews" / previews[0]).size == (4 * w, 2 * h)
    events = os.listdir(tmp_path / "run" / "tensorboard")
    assert any(e.startswith("events.out.tfevents") for e in events)


def test_todays_flux_checkpoint_resumes_and_its_student_loads(tmp_path):
    golden = load_file(GOLDEN)
    expected = {k[len("distill.") :]: v for k, v in golden.items() if k.startswith("distill.")}
    run = tmp_path / "legacy"
    shutil.copytree(LEGACY, run)
    path = run / "checkpoints" / "step-0000002" / "config.json"
    saved = json.loads(path.read_text())
    assert "family" not in saved and "ema" not in saved  # written before both existed
    saved["data"], saved["output"] = str(run / "data"), str(run)
    path.write_text(json.dumps(saved))
    # written before grid pairs were the default: resuming keeps its recipe, as a user must
    cfg = DistillConfig(**{**saved, "steps": 4, "resume": True, "ema": False, "grid_fraction": 0.0})
    student = distill(cfg)
    state = student.trainable_state_dict()
    assert state.keys() == expected.keys()
    # recomputed training steps: fp32 rounding of the machine that stored them
    assert_close_to(flat(state, expected), flat(expected, expected), FP32, "trained state")
    tr = get_family("flux").tiny_model(0, torch.float32, False)
    loaded = FluxStudent.from_pretrained(tr, os.path.join(LEGACY, "student"))
    # loading does no arithmetic; the two files were stored by one machine's runs
    loaded_state = loaded.trainable_state_dict()
    assert loaded_state.keys() == expected.keys()
    assert_close_to(flat(loaded_state, expected), flat(expected, expected), FP64, "loaded student")


def test_every_flag_has_help_and_shows_its_default(capsys):
    for command in ("train", "prepare", "make-data"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        flags = [w for w in out.split() if w.startswith("--") and w != "--help"]
        assert flags
    assert set(HELP) == {f.name for f in dataclasses.fields(DistillConfig)} - {
        "data",
        "output",
        "model",
        "tiny",
        "resume_from",  # given as --resume PATH
    }
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (name, action.dest)
                assert "%(default)" in p.formatter_class("x")._get_help_string(action)


def test_named_errors_before_any_step(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(distill_module, "_train_step", lambda run: calls.append(1))
    out = ["--output", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]
    hy = data(tmp_path, "hunyuanimage2")
    flux = data(tmp_path, "flux")
    # a HunyuanImage 2.1 checkpoint, detected from its config; given as FLUX it is refused
    ckpt = tmp_path / "hy21" / "transformer"
    get_family("hunyuanimage2").tiny_model(0, torch.float32, False).save_pretrained(ckpt)
    err = usage_error(["train", "--model", str(ckpt.parent), "--family", "flux",
                        "--data", str(hy), *out], capsys)  # fmt: skip
    assert "not FLUX" in err
    err = usage_error(["train", "--model", str(ckpt.parent), "--data", str(flux), *out], capsys)
    assert "prompt_attention_mask" in err  # detected as HunyuanImage 2.1: FLUX data lacks it
    meanflow = tmp_path / "hy21-distilled" / "transformer"
    HunyuanImageTransformer2DModel(**(TINY_HY21_CONFIG | {"use_meanflow": True})).save_pretrained(
        meanflow
    )
    err = usage_error(["train", "--model", str(meanflow.parent), "--data", str(hy), *out], capsys)
    assert "use_meanflow" in err  # Tencent's distilled student is not a teacher
    wrong = data(tmp_path / "w", "hunyuanimage2", channels=3)
    err = usage_error(["train", "--tiny", "--family", "hunyuanimage2", "--data", str(wrong),
                        *out], capsys)  # fmt: skip
    assert "channels" in err
    other = tmp_path / "sana"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "SanaTransformer2DModel"}))
    assert "none of the families" in usage_error(
        ["train", "--model", str(other), "--data", str(flux), *out], capsys
    )
    assert "family" in usage_error(
        ["train", "--tiny", "--family", "sana", "--data", str(flux), *out], capsys
    )
    assert "guidance" in usage_error(
        ["train", "--tiny", "--family", "hunyuanimage3", "--tiny-guidance",
         "--data", str(data(tmp_path, "hunyuanimage3")), *out], capsys,
    )  # fmt: skip
    assert "ema_decay" in usage_error(
        ["train", "--tiny", "--data", str(flux), "--ema-decay", "1.5", *out], capsys
    )
    with pytest.raises(ValueError, match="with text encoders, not tiny; student 'arcflow' takes"):
        config(tmp_path, "flux", validation_prompts="p", student="arcflow", r_embedding="native")
    err = usage_error(["train", "--steps", "1"], capsys)  # every missing flag at once
    assert "train needs --data; --model or --tiny; --output (the run folder)" in err
    assert not calls


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cli_make_data_and_a_tiny_run(tmp_path, family, capsys):
    folder = tmp_path / "d"
    argv = ["make-data", str(folder), "--family", family, "--height", "4", "--width", "4"]
    assert main([*argv, "--num-files", "1"]) == 0
    assert "wrote 1 files" in capsys.readouterr().out
    argv = ["train", "--tiny", "--family", family, "--data", str(folder)]
    argv += ["--output", str(tmp_path / "out"), "--steps", "1", "--device", "cpu"]
    argv += ["--weights-dtype", "fp32", "--no-progress", "--lora-rank", "2", "--report-to", "none"]
    assert main(argv) == 0
    student = tmp_path / "out" / "student"
    assert os.path.isfile(student / get_family(family).student_config_name)


@pytest.mark.parametrize("family", ["flux", "hunyuanimage2"])
def test_grid_fraction_draws_the_intervals_of_the_familys_few_step_grids(tmp_path, family):
    import dataclasses

    from mfcore.adapters.distill import build_run, resolve_family
    from mfcore.adapters.distill_config import GRID_STEPS

    data_dir = str(tmp_path / "data")
    make_synthetic_data(data_dir, family=family, num_files=1, per_file=2, height=8, width=8)
    cfg = DistillConfig(data=data_dir, output=str(tmp_path / "o"), tiny=True, family=family,
                        device="cpu", weights_dtype="fp32", lora_rank=2, progress=False,
                        grid_fraction=1.0)  # fmt: skip
    run = build_run(dataclasses.replace(cfg, family=resolve_family(cfg)))
    r, t = run.loss.time_sampler(512, generator=torch.Generator().manual_seed(0))
    fam = get_family(family)
    grids = [fam.sampling_grid(k, 8, 8, dtype=torch.float64).float() for k in GRID_STEPS]
    intervals = {(float(g[i + 1]), float(g[i])) for g in grids for i in range(len(g) - 1)}
    drawn = {(float(a), float(b)) for a, b in zip(r, t, strict=True)}
    assert drawn == intervals  # every interval of every grid, and nothing else
    with pytest.raises(ValueError, match="grid_fraction"):
        DistillConfig(data=data_dir, output="o", tiny=True, grid_fraction=1.5)


def _tiny_train(folder: str, out: str, *flags: str) -> list[str]:
    """A quiet CPU ``train --tiny`` command line (rank-2 LoRA, no previews, no reporter)."""
    return ["train", "--tiny", "--data", folder, "--output", out, "--lora-rank", "2",
            "--device", "cpu", "--weights-dtype", "fp32", "--no-progress", "--report-to",
            "none", "--preview-every", "0", *flags]  # fmt: skip


def test_resume_remembers_the_runs_settings_and_refuses_a_changed_one_by_name(tmp_path, capsys):
    folder = str(data(tmp_path, "flux"))
    out = str(tmp_path / "run")
    assert main(_tiny_train(folder, out, "--steps", "2", "--checkpoint-every", "2",
                            "--warmup-steps", "1")) == 0  # fmt: skip
    # the docs' resume line: only what locates the run and what may change
    assert main(["train", "--output", out, "--steps", "3", "--resume", "--no-progress"]) == 0
    assert latest_checkpoint(out).endswith("step-0000003")
    saved = json.loads((tmp_path / "run/checkpoints/step-0000003/config.json").read_text())
    assert saved["warmup_steps"] == 1 and saved["lora_rank"] == 2 and saved["tiny"] is True
    err = usage_error(["train", "--output", out, "--steps", "4", "--resume",
                        "--warmup-steps", "5"], capsys)  # fmt: skip
    assert "warmup_steps: 1 -> 5" in err
    err = usage_error(["train", "--output", str(tmp_path / "none"), "--resume"], capsys)
    assert "has no checkpoint" in err
    err = usage_error(["train", "--output", out], capsys)  # a new run needs its sources
    assert "train needs --data; --model or --tiny\n" in err


def test_resume_takes_latest_a_run_folder_or_one_checkpoint(tmp_path, capsys):
    """--resume latest|PATH, as diffusers' --resume_from_checkpoint: a run folder resumes its
    newest checkpoint, a checkpoint folder that one (and the run is its output)."""
    folder = str(data(tmp_path, "flux"))
    out = str(tmp_path / "run")
    assert main(_tiny_train(folder, out, "--steps", "4", "--checkpoint-every", "2",
                            "--keep-checkpoints", "3")) == 0  # fmt: skip
    step2 = os.path.join(out, "checkpoints", "step-0000002")
    step4 = os.path.join(out, "checkpoints", "step-0000004")
    original = load_file(os.path.join(step4, "student.safetensors"))
    # from step 2 again, without --output: the checkpoint names the run; a resume is exact
    # (one process: the same weights bit for bit, the contract of a resumed run)
    assert main(["train", "--resume", step2, "--steps", "4", "--no-progress"]) == 0
    redone = load_file(os.path.join(step4, "student.safetensors"))
    assert redone.keys() == original.keys()
    assert all(torch.equal(redone[k], original[k]) for k in original)
    assert main(["train", "--resume", out, "--steps", "5", "--no-progress"]) == 0  # the newest
    assert latest_checkpoint(out).endswith("step-0000005")
    assert main(["train", "--resume", "latest", "--output", out, "--steps", "6",
                 "--no-progress"]) == 0  # fmt: skip
    assert latest_checkpoint(out).endswith("step-0000006")
    err = usage_error(["train", "--resume", str(tmp_path / "nowhere"), "--steps", "7"], capsys)
    assert "neither a run folder" in err
    err = usage_error(["train", "--resume", "--steps", "7"], capsys)
    assert "--resume latest needs --output" in err
    other = str(tmp_path / "other")
    err = usage_error(["train", "--resume", step4, "--output", other, "--steps", "7"], capsys)
    assert "not of --output" in err
    with open(os.path.join(step4, "student.safetensors"), "wb") as f:
        f.write(b"junk")  # corrupt: the checkpoint asked for by name is not swapped for another
    err = usage_error(["train", "--resume", step4, "--steps", "7"], capsys)
    assert "step-0000004" in err and "does not read back whole" in err


def test_every_enumerated_train_flag_lists_its_choices(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    listed = [("--switch", "gated,fixed,never"), ("--jvp", "func,autograd,fd"),
              ("--parallel", "auto,none,ddp,fsdp"), ("--align", "none,fake,meanflow"),
              ("--weights-dtype", "bf16,fp32,fp64"), ("--family", "auto,flux")]  # fmt: skip
    for flag, values in listed:
        assert f"{flag} {{{values}" in text, flag
    err = usage_error(["train", "--tiny", "--data", "d", "--output", "o", "--jvp", "nope"], capsys)
    assert "invalid choice: 'nope'" in err


def test_teacher_guidance_reaches_the_runs_teacher(tmp_path, capsys):
    from mfcore.adapters.distill import build_run, resolve_family

    data_dir = str(tmp_path / "data")
    make_synthetic_data(data_dir, family="hunyuanimage2", num_files=1, per_file=2, height=8,
                        width=8, negatives=True)  # fmt: skip
    cfg = DistillConfig(data=data_dir, output=str(tmp_path / "o"), tiny=True,
                        family="hunyuanimage2", device="cpu", weights_dtype="fp32", lora_rank=2,
                        progress=False, true_cfg_scale=4.0, teacher_guidance="apg",
                        apg_norm_threshold=2.0)  # fmt: skip
    run = build_run(dataclasses.replace(cfg, family=resolve_family(cfg)))
    assert (run.teacher.rule, run.teacher.apg_norm_threshold) == ("apg", 2.0)
    with pytest.raises(ValueError, match="teacher_guidance"):
        DistillConfig(data=data_dir, output="o", tiny=True, teacher_guidance="pag")
    err = usage_error(["train", "--tiny", "--data", data_dir, "--output", "o",
                       "--teacher-guidance", "pag"], capsys)  # fmt: skip
    assert "invalid choice: 'pag'" in err
