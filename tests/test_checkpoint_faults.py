"""Checkpoints that a kill, a bad write or a changed folder must not destroy (issue 17,
section 2): atomic swaps, fall-back past a corrupt checkpoint, fsync, non-finite weights,
checkpoint naming, --steps and data checks on resume, the metrics log and TensorBoard."""

from __future__ import annotations

import importlib.machinery
import json
import logging
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import mfcore.adapters.run_checkpoints as run_checkpoints
import mfcore.toys.train as toy
from mfcore.adapters import _durable
from mfcore.adapters._state import load_state, save_state
from mfcore.adapters.data import make_synthetic_data
from mfcore.adapters.distill import DistillConfig, distill, latest_checkpoint
from mfcore.adapters.distill_cli import main
from mfcore.adapters.monitor import RunLog
from mfcore.toys.checkpoints import save_checkpoint
from mfcore.toys.gmm import preset
from mfcore.toys.recipe import student_net

TOY = dict(
    steps=4,
    batch=16,
    hidden=16,
    depth=1,
    align="none",
    discrete_steps=2,
    eval_samples=32,
    teacher_steps=2,
    probe_every=2,
    progress=False,
    figures=False,
    save_every=2,
)


def toy_run(tmp_path, name="toy", **kw) -> dict:
    return toy.run(dict(TOY, out_dir=str(tmp_path), name=name, **kw))


def config(tmp_path, name="run", **kw) -> DistillConfig:
    base = dict(
        data=str(tmp_path / "data"),
        output=str(tmp_path / name),
        tiny=True,
        family="flux",
        steps=4,
        switch="never",
        warmup_ode_steps=1,
        checkpoint_every=2,
        lora_rank=2,
        batch_size=2,
        device="cpu",
        weights_dtype="fp32",
        progress=False,
        preview_every=0,
        report_to="none",
    )
    return DistillConfig(**(base | kw))


@pytest.fixture
def flux_data(tmp_path):
    folder = tmp_path / "data"
    make_synthetic_data(folder, num_files=2, per_file=2, height=4, width=4, seq_len=4)
    return folder


def argv(tmp_path, *flags) -> list[str]:
    common = ["train", "--tiny", "--data", str(tmp_path / "data"), "--output"]
    common += [str(tmp_path / "run"), "--device", "cpu", "--weights-dtype", "fp32"]
    common += ["--lora-rank", "2", "--batch-size", "2", "--switch", "never"]
    common += ["--warmup-ode-steps", "1", "--checkpoint-every", "2", "--preview-every", "0"]
    return [*common, "--report-to", "none", "--no-progress", *flags]


def usage_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    return capsys.readouterr().err


class Killed(BaseException):
    pass


# --------------------------------------------------------------------------- kill during a save


@pytest.mark.parametrize("kill_at", ["sync", "replace-1", "replace-2", "delete-old"])
def test_toy_kill_during_save_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch, kill_at):
    toy_run(tmp_path)
    run_dir = tmp_path / "toy"
    cfg = toy.ToyConfig(**dict(TOY, out_dir=str(tmp_path), name="toy", resume=True))
    state = toy.read_checkpoint(cfg)
    assert state["step"] == 4
    newer = dict(state, step=5)
    calls = {"replace": 0}
    real_replace, real_rmtree, real_sync = os.replace, shutil.rmtree, _durable.sync_tree

    def replace(src, dst):
        calls["replace"] += 1
        if kill_at == f"replace-{calls['replace']}":
            raise Killed
        return real_replace(src, dst)

    def rmtree(path, *args, **kw):
        if kill_at == "delete-old" and str(path).endswith(".old"):
            raise Killed
        return real_rmtree(path, *args, **kw)

    def sync(path):
        if kill_at == "sync":
            raise Killed
        return real_sync(path)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(_durable, "sync_tree", sync)
    with pytest.raises(Killed):
        save_checkpoint(run_dir, newer)
    monkeypatch.undo()
    assert toy.read_checkpoint(cfg)["step"] in (4, 5)
    # and the next save tidies up whatever the kill left
    save_checkpoint(run_dir, dict(state, step=6))
    assert toy.read_checkpoint(cfg)["step"] == 6
    assert sorted(os.listdir(run_dir / "checkpoint")) == ["state.json", "state.safetensors"]


# --------------------------------------------------------------------------- corrupt newest


def _truncate(path) -> None:
    with open(path, "rb") as f:
        head = f.read(100)
    with open(path, "wb") as f:
        f.write(head)


def test_distill_resume_falls_back_past_a_corrupt_newest_checkpoint(tmp_path, flux_data, caplog):
    distill(config(tmp_path, grad_clip=math.inf))  # (inf: the config.json holds Infinity)
    newest = latest_checkpoint(tmp_path / "run")
    assert newest.endswith("step-0000004")
    _truncate(os.path.join(newest, "student.safetensors"))
    with caplog.at_level(logging.INFO, logger="mfcore.adapters.distill"):
        distill(config(tmp_path, grad_clip=math.inf, steps=6, resume=True))
    text = caplog.text
    assert "skipping a corrupt checkpoint" in text and "step-0000004" in text
    assert "student.safetensors" in text and "resumed from" in text
    assert "step-0000002 at step 2" in text
    assert latest_checkpoint(tmp_path / "run").endswith("step-0000006")


def test_distill_resume_past_a_corrupt_checkpoint_sets_it_aside_so_pruning_keeps_the_good_ones(
    tmp_path, flux_data
):
    # keep 1: step 4 corrupt, resumed from step 2; the new step 6 must survive the pruning,
    # which (by step number) would otherwise keep the corrupt step 4's folder
    distill(config(tmp_path, keep_checkpoints=2))
    _truncate(os.path.join(tmp_path / "run" / "checkpoints" / "step-0000004",
                           "student.safetensors"))  # fmt: skip
    distill(config(tmp_path, keep_checkpoints=1, steps=3, resume=True))
    names = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert names == ["step-0000003", "step-0000004.corrupt"], names


def test_distill_keeps_the_newest_verified_checkpoint_until_its_successor_is_verified(
    tmp_path, flux_data, monkeypatch
):
    honest = run_checkpoints._write_state

    def bad_disk_at_four(run, folder):
        honest(run, folder)
        if run.step == 4:
            _truncate(os.path.join(folder, "student.safetensors"))

    monkeypatch.setattr(run_checkpoints, "_write_state", bad_disk_at_four)
    distill(config(tmp_path, keep_checkpoints=1))
    names = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert names == ["step-0000002", "step-0000004.unverified"]
    monkeypatch.undo()
    # the kept one resumes (the unverified one is not a checkpoint name)
    distill(config(tmp_path, keep_checkpoints=1, steps=6, resume=True))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == [
        "step-0000004.unverified",
        "step-0000006",
    ]


# --------------------------------------------------------------------------- fsync


def test_checkpoints_students_and_metrics_are_fsynced(tmp_path, flux_data, monkeypatch):
    synced: set[str] = set()
    real = os.fsync

    def fsync(fd):
        synced.add(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).removesuffix(".tmp"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    distill(config(tmp_path, steps=2))
    toy_run(tmp_path, steps=2)
    for name in ("student.safetensors", "state.safetensors", "state.json", "config.json"):
        assert name in synced, name  # a distillation checkpoint (and the toy's state)
    for name in ("pytorch_lora_weights.safetensors", "interval_embedding.safetensors"):
        assert name in synced, name  # the exported student
    assert {"metrics.jsonl", "metrics.json"} <= synced, sorted(synced)


# --------------------------------------------------------------------------- non-finite weights


def _poison(stem) -> None:
    state = load_state(stem)
    key = next(iter(state["student"]))
    state["student"][key] = torch.full_like(state["student"][key], math.nan)
    save_state(state, stem)


def test_non_finite_weights_are_refused_on_load_and_never_overwrite_a_finite_student(tmp_path):
    toy_run(tmp_path)
    run_dir = tmp_path / "toy"
    good = load_file(str(run_dir / "student.safetensors"))
    _poison(run_dir / "checkpoint" / "state")
    with pytest.raises(ValueError, match="non-finite"):
        toy_run(tmp_path, resume=True)
    # the writer refuses too: a collapsed student never replaces a finite one
    student = student_net(toy.ToyConfig(**TOY), preset("ring8"), None)
    with torch.no_grad():
        next(iter(student.parameters())).fill_(math.inf)
    cfg = toy.ToyConfig(**dict(TOY, out_dir=str(tmp_path), name="toy"))
    toy._write(cfg, {}, {}, preset("ring8"), student)
    now = load_file(str(run_dir / "student.safetensors"))
    assert all(torch.equal(good[k], now[k]) for k in good)


def test_distill_never_exports_non_finite_weights_over_a_finite_student(tmp_path, flux_data):
    student = distill(config(tmp_path, steps=2))
    folder = tmp_path / "run" / "student"
    before = {p: (folder / p).read_bytes() for p in os.listdir(folder)}
    with torch.no_grad():
        student.trainable_parameters()[0].fill_(math.nan)
    with pytest.raises(FloatingPointError, match="not exported"):
        run_checkpoints.export_student(student, str(folder))
    assert {p: (folder / p).read_bytes() for p in os.listdir(folder)} == before


# --------------------------------------------------------------------------- which checkpoint


def test_resume_ignores_foreign_folders_and_orders_steps_as_numbers(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-best", "step-9999999", "step-10000000", "step-10000001.tmp", "notes"):
        (root / name).mkdir(parents=True)
    (root / "step-20000000").write_text("a file, not a checkpoint")
    assert latest_checkpoint(tmp_path) == str(root / "step-10000000")


# --------------------------------------------------------------------------- --steps


def test_resume_with_fewer_steps_than_the_checkpoint_is_a_usage_error(tmp_path, flux_data, capsys):
    assert main(argv(tmp_path, "--steps", "4")) == 0
    err = usage_error(argv(tmp_path, "--steps", "2", "--resume"), capsys)
    assert "--steps 2" in err and "step 4" in err and "step-0000004" in err


# --------------------------------------------------------------------------- data changed


def test_resume_refuses_changed_data_or_warns_with_allow_data_change(tmp_path, flux_data, caplog):
    distill(config(tmp_path, steps=2))
    make_synthetic_data(tmp_path / "more", num_files=3, per_file=2, height=4, width=4, seq_len=4)
    shutil.copy(tmp_path / "more" / "samples-00002.safetensors", flux_data)
    with pytest.raises(ValueError, match=r"changed since .* \(added samples-00002.safetensors\)"):
        distill(config(tmp_path, steps=4, resume=True))
    # with too few --steps as well: both in one error
    with pytest.raises(ValueError, match=r"--steps 1 is below the step 2 .*; the data folder"):
        distill(config(tmp_path, steps=1, resume=True))
    with caplog.at_level(logging.WARNING, logger="mfcore.adapters.distill"):
        distill(config(tmp_path, steps=4, resume=True, allow_data_change=True))
    assert "added samples-00002.safetensors" in caplog.text
    # the new checkpoint records the data it ran on
    record = json.loads((tmp_path / "run/checkpoints/step-0000004/data.json").read_text())
    assert [name for name, _ in record["files"]] == [f"samples-0000{i}.safetensors" for i in "012"]


# --------------------------------------------------------------------------- metrics log


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, flux_data, caplog):
    distill(config(tmp_path, steps=2))
    log = tmp_path / "run" / "metrics.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 3, "loss": 0.')  # killed while writing step 3
    with caplog.at_level(logging.WARNING, logger="mfcore.adapters.monitor"):
        distill(config(tmp_path, steps=4, resume=True))
    assert "torn last line" in caplog.text
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_metrics_jsonl_is_strict_json_with_null_for_non_finite(tmp_path):
    log = RunLog(str(tmp_path), 0, report_to="none")
    log.metrics(
        1,
        {
            "loss": math.inf,
            "gate": -math.inf,
            "ratio": math.nan,
            "ok": 0.5,
            "bins": [1.0, math.inf],
        },
    )
    log.close()
    row = _strict((tmp_path / "metrics.jsonl").read_text())
    assert row == {
        "step": 1,
        "loss": None,
        "gate": None,
        "ratio": None,
        "ok": 0.5,
        "bins": [1.0, None],
    }


def test_tensorboard_keeps_the_checkpoint_step_after_resume(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    image = [Image.new("L", (4, 4))]
    log = RunLog(str(tmp_path), 0)
    for step in (1, 2, 3):  # the checkpoint is at step 2; step 3 dies with the run
        log.metrics(step, {"loss": float(step)})
    log.table(2, [image])
    log.close()
    log = RunLog(str(tmp_path), 2)  # resumed from step 2
    for step in (3, 4):
        log.metrics(step, {"loss": 10.0 * step})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = {e.step: e.value for e in events.Scalars("loss")}
    assert loss == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0}
    assert [e.step for e in events.Images("preview")] == [2]


class _FakeWandb:
    """A stand-in for the wandb package (not installed here): records what RunLog calls."""

    __spec__ = importlib.machinery.ModuleSpec("wandb", None)  # found as installed

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self

    def log(self, values, step):
        self.calls.append(("log", dict(values), step))

    def finish(self):
        self.calls.append(("finish",))

    class Image:
        def __init__(self, image) -> None:
            self.size = image.size


def test_report_to_wandb_logs_offline_into_the_run_folder(tmp_path, monkeypatch):
    """The wandb reporter against a stand-in module: an offline run in <output>/wandb whose
    id the run folder fixes (a resume continues it), scalars and previews at their steps."""
    import sys

    from PIL import Image

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log = RunLog(str(tmp_path), 0, report_to="wandb", settings={"lr": 1e-4})
    log.metrics(1, {"loss": 0.5, "phase": "discrete", "flag": True})
    log.table(1, [[Image.new("L", (4, 4))]])
    log.close()
    RunLog(str(tmp_path), 1, report_to="wandb").close()  # resumed
    (first, init), (second, again) = fake.calls[0], fake.calls[4]
    assert first == second == "init" and init["id"] == again["id"]
    assert init["mode"] == "offline" and init["dir"] == str(tmp_path / "wandb")
    assert init["config"] == {"lr": 1e-4} and init["resume"] == "allow"
    assert fake.calls[1] == ("log", {"loss": 0.5}, 1)  # numbers only
    assert fake.calls[2][0] == "log" and fake.calls[2][2] == 1
    assert fake.calls[2][1]["preview"].size == (4, 4)
    assert fake.calls[3] == ("finish",)
    assert (tmp_path / "metrics.jsonl").read_text().count('"step": 1') == 1


def test_report_to_refuses_an_unknown_reporter_and_a_missing_wandb(tmp_path, monkeypatch):
    import importlib.util

    with pytest.raises(ValueError, match="report_to"):
        RunLog(str(tmp_path), 0, report_to="mlflow")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ValueError, match="pip install wandb"):
        config(tmp_path, report_to="wandb")
