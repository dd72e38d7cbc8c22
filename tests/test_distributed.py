"""``mfcore-distill`` under torch.distributed: 2 gloo processes on CPU, spawned from pytest.

A step of the full seed method (differential target through the ``func`` JVP behind the
guard, plus the fake critic's alignment) under FSDP2 and DDP equals the one-process step on
the same global batch; a killed run resumes bit-identically from its DCP checkpoint; the
exported LoRA loads with diffusers and equals the one-process result; FSDP2's traps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mfcore.adapters.distill_cli import main as cli_main
from tests import _distributed as D

# Multi-process runs go on one pytest-xdist worker, one after another (CI runs the slow step
# with --dist loadgroup): two gloo jobs at once on 2 cores slowed each other enough to trip
# a rare teardown abort once in about ten runs.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` (0 when both are 0)."""
    num, den = (a.double() - b.double()).norm(), b.double().norm()
    return float(num / den) if den > 0 else float(num)


def _keys(got: dict, ref: dict, prefix: str) -> list[str]:
    keys = sorted(k for k in ref if k.startswith(prefix))
    assert keys and keys == sorted(k for k in got if k.startswith(prefix))
    return keys


def vector_rel(got: dict, ref: dict, prefix: str) -> float:
    """:func:`rel` of all the tensors under ``prefix`` as one vector (the gradient)."""
    keys = _keys(got, ref, prefix)
    return rel(
        torch.cat([got[k].flatten() for k in keys]), torch.cat([ref[k].flatten() for k in keys])
    )


def worst(got: dict, ref: dict, prefix: str) -> float:
    """The largest :func:`rel` of one tensor under ``prefix``."""
    return max(rel(got[k], ref[k]) for k in _keys(got, ref, prefix))


@pytest.mark.parametrize("family", ["flux", "hunyuanimage2", "hunyuanimage3"])
def test_one_step_under_fsdp2_and_ddp_equals_one_process(tmp_path, family):
    """Global batch 4. FSDP2: 2 ranks accumulating 2 micro-batches of 1; DDP: 2 rows per rank.

    fp32 (parameters and reductions): each equals the one-process step that computes the
    same micro-batches (fp32 kernels round differently for other batch shapes). fp64: each
    equals the one-process step on the whole batch, so the split itself is exact.
    """
    D.make_data(tmp_path, family)
    modes = {"fsdp": {"parallel": "fsdp", "micro_batch_size": 1}, "ddp": {"parallel": "ddp"}}
    rows = {"fsdp": 1, "ddp": 2}
    jobs = [
        (D.config(tmp_path, family, f"{m}-{d}", weights_dtype=d, **kw), f"{m}-{d}")
        for m, kw in modes.items()
        for d in ("fp32", "fp64")
    ]
    D.spawn(D.one_step_worker, tmp_path, jobs)
    whole = D.one_step(D.config(tmp_path, family, "one", weights_dtype="fp64"))
    report = {}
    for mode in modes:
        same = D.one_step(D.config(tmp_path, family, f"one-{mode}", micro_batch_size=rows[mode]))
        for dtype, ref in (("fp32", same), ("fp64", whole)):
            got = load_file(tmp_path / f"{mode}-{dtype}.safetensors")
            report[f"{mode}-{dtype}"] = {
                "loss": rel(got["loss"], ref["loss"]),
                "grad": vector_rel(got, ref, "grad/"),
                "after": vector_rel(got, ref, "after/"),
                "grad_tensor": worst(got, ref, "grad/"),  # small tensors with cancellation
                "after_tensor": worst(got, ref, "after/"),
            }
    print(family, json.dumps(report))
    interval = [v for k, v in whole.items() if k.startswith("grad/interval.")]
    assert interval and sum(float(g.abs().sum()) for g in interval) > 0  # it trains too
    for tag, r in report.items():
        assert r["loss"] < 1e-6, (tag, r)  # a logged mean of fp32 per-sample losses
        if tag.endswith("fp32"):  # the reduction order differs: fp32 rounding, summed
            assert r["grad"] < 1e-6 and r["after"] < 1e-6, (tag, r)
        else:  # the split itself is exact
            assert r["grad_tensor"] < 1e-10 and r["after_tensor"] < 1e-10, (tag, r)


def test_bf16_policy_is_close_to_one_process(tmp_path):
    D.make_data(tmp_path, "flux")
    cfg = D.config(tmp_path, "flux", "one", weights_dtype="bf16")
    ref = D.one_step(cfg)
    bf16 = D.config(tmp_path, "flux", "bf", parallel="fsdp", weights_dtype="bf16")
    D.spawn(D.one_step_worker, tmp_path, [(bf16, "bf16")])
    got = load_file(tmp_path / "bf16.safetensors")
    loss, grad = rel(got["loss"], ref["loss"]), vector_rel(got, ref, "grad/")
    print("bf16", loss, grad, worst(got, ref, "grad/"))
    # bf16 compute of the fp32 LoRA (FSDP2's param_dtype) against fp32 LoRA on a bf16 base
    assert 0 < loss < 1e-3 and grad < 1e-2  # (0: the policy did cast, not the fp32 result)


def test_fsdp2_traps(tmp_path):
    D.make_data(tmp_path, "flux")
    D.spawn(D.traps_worker, tmp_path, D.config(tmp_path, "flux", "traps", parallel="fsdp"))
    report = json.loads((tmp_path / "traps.json").read_text())
    assert report["sharded"]
    assert report["ours_grads"]  # lora_disabled left the LoRA trainable inside the units
    assert "deepcopy" in report["deepcopy"]  # FSDP2 refuses to copy a sharded model
    # peft's switch would freeze LoRA tensors (here the critic's, which it deactivates)
    assert 0 < report["peft_frozen"] < report["lora"]
    # forward AD through the sharded blocks gives each rank the one-process du/dt
    run = D.setup(D.config(tmp_path, "flux", "traps-one"))
    x, cond = run.data.batch(0, 2, 0, "cpu")
    t, r = torch.tensor([0.7, 0.4]), torch.tensor([0.2, 0.4])
    from mfcore.jvp import total_derivative

    v = run.teacher(x, t, **cond)
    _, dudt = total_derivative(run.student, x, r, t, v, method="func", cond=cond, keep_graph=False)
    for rank in range(D.WORLD):
        sharded = load_file(tmp_path / f"dudt-{rank}.safetensors")["dudt"]
        assert rel(sharded, dudt) < 1e-6
    base = sum(1 for p in run.student.transformer.parameters() if not p.requires_grad)
    assert report["base_params"] == base  # the critic added no copy of the base


def _lora_output(folder, x, cond, t):
    """A stock tiny FLUX with ``folder``'s LoRA loaded by diffusers' pipeline loader."""
    from diffusers import FluxPipeline

    from mfcore.adapters.family import get_family

    family = get_family("flux")
    plain = family.tiny_model(0, torch.float32, False)
    pipe = FluxPipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=plain,
    )  # fmt: skip
    pipe.load_lora_weights(str(folder), adapter_name="distilled")
    call = family.call_inputs(plain, x, cond, 3.5, False)
    with torch.no_grad():
        return family.velocity(plain, x, t, call.inputs)


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_killed_run_resumes_bit_identically_and_its_lora_loads_with_diffusers(tmp_path, mode):
    D.make_data(tmp_path, "flux")
    cfg = D.config(tmp_path, "flux", "unused", parallel=mode, steps=4, checkpoint_every=2,
                   micro_batch_size=1)  # fmt: skip
    D.spawn(D.resume_worker, tmp_path, cfg)
    got = load_file(tmp_path / "resume.safetensors")
    ends = {k.split("/", 1)[1]: v for k, v in got.items() if k.startswith("straight/")}
    assert len(ends) > 10
    for name, value in ends.items():  # weights (EMA in the student) and the critic, bit for bit
        assert torch.equal(value, got[f"killed/{name}"]), name
    exported = [tmp_path / n / "student" for n in ("straight", "killed")]
    files = [load_file(f / "pytorch_lora_weights.safetensors") for f in exported]
    assert files[0].keys() == files[1].keys()
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])
    # the rollback's copy of the switch (sharded) is in the DCP checkpoint, and restores
    copy = sorted(k.split("/", 2)[2] for k in got if k.startswith("copy/0/"))
    assert any(k.startswith("optim/") for k in copy) and any(k.startswith("ema/") for k in copy)
    assert all(torch.equal(got[f"copy/0/{k}"], got[f"copy/1/{k}"]) for k in copy)
    rolled = [k for k in got if k.startswith("rolled/0/")]
    assert all(torch.equal(got[k], got[k.replace("/0/", "/1/", 1)]) for k in rolled)
    # the distributed run's LoRA loads with diffusers and equals the one-process run's
    one = D.config(tmp_path, "flux", "one", steps=4, checkpoint_every=2, micro_batch_size=1)
    D.distill_module.distill(one)
    mine = load_file(tmp_path / "one" / "student" / "pytorch_lora_weights.safetensors")
    assert mine.keys() == files[0].keys()
    keys = sorted(mine)
    lora = rel(
        torch.cat([files[0][k].flatten() for k in keys]),
        torch.cat([mine[k].flatten() for k in keys]),
    )
    run = D.setup(one)
    x, cond = run.data.batch(0, 4, 0, "cpu")
    t = torch.tensor([0.9, 0.6, 0.3, 0.1])
    out = rel(
        _lora_output(exported[0], x, cond, t),
        _lora_output(tmp_path / "one" / "student", x, cond, t),
    )
    print("export", lora, out)
    assert lora < 1e-5 and out < 1e-5
    base = rel(_lora_output(exported[0], x, cond, t), run.teacher(x, t, **cond))
    assert base > 1e-4  # the LoRA changes the model: the comparison is not of two bases


def _torchrun(nproc: int, *argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={nproc}", "-m", "mfcore.adapters.distill", *argv]
    # faulthandler: an abort in a rank prints that rank's Python stack into the log
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_torchrun_runs_the_command_line(tmp_path):
    folder = D.make_data(tmp_path, "hunyuanimage2")
    out = tmp_path / "run"
    argv = ["train", "--tiny", "--family", "hunyuanimage2", "--data", folder, "--output",
            str(out), "--device", "cpu", "--weights-dtype", "fp32", "--lora-rank", "2",
            "--batch-size", "2", "--no-progress", "--report-to", "none", "--preview-every", "1",
            "--checkpoint-every", "2", "--align", "fake", "--critic-rank", "2"]  # fmt: skip
    done = _torchrun(2, *argv, "--steps", "2", "--parallel", "fsdp")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2]  # logged once, by rank 0
    ckpt = D.distill_module.latest_checkpoint(out)
    assert {"dcp", "rank-00000.json", "rank-00001.json", "config.json"} <= set(os.listdir(ckpt))
    assert sorted(os.listdir(out / "previews")) == ["step-0000001.png", "step-0000002.png"]
    assert (out / "student" / "pytorch_lora_weights.safetensors").is_file()
    # another world size, or one process, is refused by name
    done = _torchrun(1, *argv, "--steps", "3", "--parallel", "fsdp", "--resume")
    assert done.returncode != 0 and "written by 2 processes" in done.stderr
    with pytest.raises(SystemExit) as exc:
        cli_main([*argv, "--steps", "3", "--resume"])
    assert exc.value.code == 2


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_a_revert_and_previews_run_as_in_one_process(tmp_path, mode):
    """The guard reverts (rolling back the weights) and EMA previews run between steps: a
    2-rank run takes the same decisions and ends with the one-process weights."""
    D.make_data(tmp_path, "flux")
    common = dict(steps=8, warmup_steps=2, signal_every=2, guard_patience=1, checkpoint_every=8,
                  preview_every=1, micro_batch_size=1)  # fmt: skip
    cfg = D.config(tmp_path, "flux", mode, parallel=mode, **common)
    D.spawn(D.run_worker, tmp_path, cfg, True)
    D.run_worker(0, str(tmp_path), D.config(tmp_path, "flux", "one", **common), True)
    rows = {}
    for name in (mode, "one"):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        rows[name] = [json.loads(line) for line in lines]
    events = {
        name: [(r["step"], k) for r in rs for k in ("warmup_switched", "warmup_reverted") if k in r]
        for name, rs in rows.items()
    }
    assert events[mode] == events["one"] and len(events["one"]) == 2, events
    assert any(r.get("rolled_back") for r in rows[mode])
    # every step's losses (the critic's from the student's trajectory first) agree
    for key in ("critic_fm", "loss"):
        values = [torch.tensor([r[key] for r in rows[n]], dtype=torch.float64) for n in rows]
        print(mode, key, rel(values[0], values[1]))
        assert rel(values[0], values[1]) < 1e-5, key
    got, ref = (load_file(tmp_path / f"{n}.safetensors") for n in (mode, "one"))
    print(mode, vector_rel(got, ref, ""))
    assert vector_rel(got, ref, "") < 1e-5
