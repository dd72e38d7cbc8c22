"""Issue 17, section 4: no hang, no silent result, every error naming its cause.

Each test is named after the item it covers. The table of plain bad arguments lives in
``tests/test_bad_input.py``; here are the cases that need more than one call: a launch
environment (in a subprocess with a short timeout, so that a regression fails instead of
hanging), a non-finite loss and what caused it, and results that used to pass silently.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from mfcore.adapters.family import get_family
from mfcore.adapters.launch import LaunchError, launch_env
from mfcore.adapters.parallel import join
from mfcore.adapters.student import MeanFlowStudent, Teacher
from mfcore.guidance import MeanFlowGuidance
from mfcore.losses import FlowMatchingLoss, MeanFlowLoss
from mfcore.targets import DifferentialTarget
from mfcore.warmup import SwitchRollback
from tests._nets import MLPStudent
from tests.test_distill import data

_STRAY = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531"}


def _run(code_or_argv: list[str], env: dict[str, str], timeout: float = 180):
    clean = {k: v for k, v in os.environ.items() if k not in (*_STRAY, "LOCAL_RANK")}
    return subprocess.run(
        [sys.executable, *code_or_argv],
        env={**clean, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------------- launch environment


def test_stray_launch_variables_without_torchrun_are_a_usage_error_not_a_hang(tmp_path):
    folder = data(tmp_path, "flux")
    argv = ["-m", "mfcore.adapters.distill", "train", "--tiny", "--data", str(folder)]
    argv += ["--output", str(tmp_path / "o"), "--device", "cpu", "--no-progress"]
    done = _run(argv, _STRAY)
    assert done.returncode == 2, done.stderr
    assert "LOCAL_RANK" in done.stderr and "WORLD_SIZE=2" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_rendezvous_whose_peers_never_come_times_out_by_name():
    code = "from mfcore.adapters.parallel import join; join('cpu', timeout=2)"
    done = _run(["-c", code], {**_STRAY, "LOCAL_RANK": "0", "MASTER_PORT": "29532"}, 60)
    assert done.returncode != 0
    assert "LaunchError" in done.stderr and "within 2 s" in done.stderr, done.stderr
    assert "WORLD_SIZE=2" in done.stderr


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE"),
        ({"RANK": "1"}, "RANK=1 is set without WORLD_SIZE"),
        ({**_STRAY, "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=3"),
        ({"WORLD_SIZE": "4", "LOCAL_RANK": "0"}, "lacks RANK, MASTER_ADDR, MASTER_PORT"),
        # every wrong variable in one error
        (
            {"WORLD_SIZE": "2", "RANK": "one", "LOCAL_RANK": "-1"},
            "RANK must be an integer.*; LOCAL_RANK=-1 .*; .* lacks MASTER_ADDR, MASTER_PORT",
        ),
    ],
)
def test_an_inconsistent_launch_environment_names_its_variables(env, names):
    with pytest.raises(LaunchError, match=names):
        launch_env(env)


def test_world_size_one_alone_is_one_process(monkeypatch):
    assert launch_env({"WORLD_SIZE": "1"}) is None
    assert launch_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert launch_env({}) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert join("cpu")[:2] == (0, 1)
    full = {**_STRAY, "LOCAL_RANK": "1", "RANK": "1"}
    launch = launch_env(full)
    assert launch is not None and (launch.rank, launch.size, launch.local_rank) == (1, 2, 1)


@pytest.mark.parametrize("local", ["SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK"])
def test_a_launch_by_srun_or_mpirun_takes_its_local_rank_from_the_launcher(local):
    launch = launch_env({**_STRAY, "RANK": "1", local: "1"})
    assert launch is not None and (launch.rank, launch.size, launch.local_rank) == (1, 2, 1)


# ---------------------------------------------------------------------- scales are finite


@pytest.mark.parametrize(
    ("kw", "names"),
    [
        ({"guidance_scale": math.nan}, "guidance_scale"),
        ({"true_cfg_scale": math.inf}, "true_cfg_scale"),
    ],
)
def test_every_teachers_guidance_scale_is_checked_for_finiteness(kw, names):
    fam = get_family("flux")
    model = fam.tiny_model(0, torch.float32, True)
    with pytest.raises(ValueError, match=f"{names} must be finite"):
        Teacher(model, fam, **kw)
    if "guidance_scale" in kw:
        with pytest.raises(ValueError, match="guidance_scale must be finite"):
            MeanFlowStudent(model, fam, **kw)


def test_a_call_time_guidance_and_the_interval_scale_are_checked_for_finiteness():
    from mfcore.adapters.interval import IntervalEmbedding
    from tests.test_flux import batch as flux_batch
    from tests.test_flux import tiny as flux_tiny

    z, _, t, cond = flux_batch()
    teacher = Teacher(flux_tiny(True), get_family("flux"))
    with pytest.raises(ValueError, match="guidance must be finite"):
        teacher(z, t, **cond, guidance=math.nan)
    with pytest.raises(ValueError, match="scale must be finite"):
        IntervalEmbedding(torch.nn.Identity(), torch.nn.Identity(), scale=math.inf)


# ---------------------------------------------------------------------- non-finite losses

X = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
RT = (torch.full((4,), 0.25), torch.full((4,), 0.75))


def _nan_at(x, row):
    x = x.clone()
    x[row, 0] = math.nan
    return x


def _poisoned_student():
    student = MLPStudent(2)
    with torch.no_grad():
        next(student.parameters())[0, 0] = math.inf
    return student


@pytest.mark.parametrize(
    ("call", "cause"),
    [
        (
            lambda: MeanFlowLoss()(MLPStudent(2), _nan_at(X, 2), step=7),
            r"step 7: the batch's data x \(sample 2\)",
        ),
        (lambda: MeanFlowLoss()(_poisoned_student(), X), r"the student's weights \(net.0.weight\)"),
        (
            lambda: MeanFlowLoss()(MLPStudent(2), X, teacher=lambda z, t: z * math.nan),
            "the teacher's output v",
        ),
        (
            lambda: MeanFlowLoss(guidance=MeanFlowGuidance(1e308, uncond={}, label_dropout=0.0))(
                MLPStudent(2), X, teacher=lambda z, t: z, r=RT[1], t=RT[1]
            ),
            r"the guided velocity \(guidance MeanFlowGuidance\(omega=1e\+308",
        ),
        (
            lambda: MeanFlowLoss(weighting=lambda sq, r, t: sq * math.inf)(
                MLPStudent(2), X, r=RT[0], t=RT[1]
            ),
            "the weighting's output",
        ),
        (lambda: FlowMatchingLoss()(lambda z, t: z * 1e30 * 1e30, X), "the model's output"),
        (
            lambda: FlowMatchingLoss()(lambda z, t: z, _nan_at(X, 1)),
            r"the batch's data x \(sample 1\)",
        ),
    ],
    ids=[
        "data",
        "student weights",
        "teacher output",
        "guidance scale",
        "weighting",
        "fm output",
        "fm data",
    ],
)
def test_every_non_finite_loss_says_what_was_non_finite_first(call, cause):
    with pytest.raises(FloatingPointError, match=f"non-finite loss in .*{cause}"):
        call()


def test_a_non_finite_alignment_loss_says_what_was_non_finite_first():
    from mfcore.critics import AlignmentLoss, KernelCritic

    align = AlignmentLoss(KernelCritic())
    with pytest.raises(FloatingPointError, match=r"alignment loss .*the student's weights \(net"):
        align.student_loss(_poisoned_student(), X, reference=X)
    with pytest.raises(FloatingPointError, match=r"alignment loss .*the reference samples"):
        align.student_loss(MLPStudent(2), X, reference=_nan_at(X, 0))


def test_a_non_finite_loss_in_mfcore_distill_names_the_step_and_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    from mfcore.adapters.distill import DistillConfig, build_run
    from mfcore.adapters.step import train_step

    folder = data(tmp_path, "flux")
    first = sorted(folder.glob("*.safetensors"))[0]
    tensors = load_file(first)
    tensors["latents"][1, 0, 0, 0] = math.nan
    save_file(tensors, first)
    cfg = DistillConfig(data=str(folder), output=str(tmp_path / "o"), tiny=True, family="flux",
                        batch_size=4, device="cpu", weights_dtype="fp32", lora_rank=2,
                        progress=False, ema=False)  # fmt: skip
    run = build_run(cfg)
    with pytest.raises(FloatingPointError) as err:
        train_step(run)
    message = str(err.value)
    assert "at step 0: the batch's data x" in message, message
    assert f"latents of row 1 of {first}" in message, message


# ---------------------------------------------------------------------- silent results


@pytest.mark.parametrize("method", ["func", "autograd", "fd"])
def test_a_student_returning_an_integer_tensor_is_refused(method):
    def student(z, r, t):
        return z.round().long()

    with pytest.raises(TypeError, match="u_fn .*floating-point.*no gradient"):
        MeanFlowLoss(target=DifferentialTarget(method))(student, X)


def test_a_teacher_returning_an_integer_tensor_is_refused():
    with pytest.raises(TypeError, match="teacher output must have a floating-point dtype"):
        MeanFlowLoss()(MLPStudent(2), X, teacher=lambda z, t: z.round().long())


def _rollback():
    net = torch.nn.Linear(2, 2)
    return net, SwitchRollback(torch.optim.SGD(net.parameters(), lr=0.1))


def test_switch_rollback_observe_refuses_a_non_mapping():
    _, rollback = _rollback()
    with pytest.raises(TypeError, match="metrics must be a mapping"):
        rollback.observe([("warmup_reverted", 1.0)])


def test_switch_rollback_observe_does_not_treat_a_zero_event_as_a_revert():
    net, rollback = _rollback()
    assert not rollback.observe({"warmup_switched": 1.0})
    with torch.no_grad():
        net.weight.add_(1.0)
    moved = net.weight.detach().clone()
    assert not rollback.observe({"warmup_reverted": 0.0, "warmup_switched": 0.0})
    assert torch.equal(net.weight, moved) and rollback.saved is not None
    assert rollback.observe({"warmup_reverted": 1.0})
    assert not torch.equal(net.weight, moved)


def test_a_fractional_attention_mask_for_hunyuanimage2_is_refused():
    from tests.test_hunyuanimage2 import FAMILY as HY2
    from tests.test_hunyuanimage2 import batch as hy2_batch
    from tests.test_hunyuanimage2 import tiny as hy2_tiny

    z, _, t, cond = hy2_batch()
    teacher = Teacher(hy2_tiny(), HY2)
    half = cond["prompt_attention_mask"].double()
    half[0, 0] = 0.5
    with pytest.raises(ValueError, match=r"prompt_attention_mask must hold only 0 and 1.*0\.5"):
        teacher(z, t, **{**cond, "prompt_attention_mask": half})
    teacher(z, t, **{**cond, "prompt_attention_mask": cond["prompt_attention_mask"].double()})


@pytest.mark.parametrize("bad", ["past", "zero", "float"])
def test_hunyuanimage3_valid_lengths_beyond_the_sequence_are_refused(bad):
    from tests.test_hunyuanimage3 import FAMILY as HY3
    from tests.test_hunyuanimage3 import batch as hy3_batch
    from tests.test_hunyuanimage3 import tiny as hy3_tiny

    z, _, t, cond = hy3_batch()
    lengths = cond["valid_lengths"].clone()
    seq = cond["input_ids"].shape[1]
    lengths = {"past": lengths + seq, "zero": lengths * 0, "float": lengths.double()}[bad]
    why = "must hold integers" if bad == "float" else rf"must lie in \[1, {seq}\]"
    with pytest.raises(ValueError, match="valid_lengths " + why):
        Teacher(hy3_tiny(), HY3)(z, t, **{**cond, "valid_lengths": lengths})


def test_hunyuanimage3_token_ids_past_the_vocabulary_are_refused():
    from tests.test_hunyuanimage3 import FAMILY as HY3
    from tests.test_hunyuanimage3 import batch as hy3_batch
    from tests.test_hunyuanimage3 import tiny as hy3_tiny

    z, _, t, cond = hy3_batch()
    model = hy3_tiny()
    ids = cond["input_ids"].clone()
    ids[0, 1] = model.config.vocab_size
    with pytest.raises(ValueError, match=r"input_ids must hold token ids in \[0, 64\)"):
        Teacher(model, HY3)(z, t, **{**cond, "input_ids": ids})


def test_make_data_sizes_that_train_refuses_are_refused_or_warned(tmp_path, caplog, capsys):
    from mfcore.adapters.distill_cli import main as distill_main

    with pytest.raises(SystemExit):  # the tiny model's widths: an error
        distill_main(["make-data", str(tmp_path / "a"), "--family", "flux", "--width", "3"])
    assert "height and width divisible by 2" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    # other widths are for another model: written, with a warning naming the refusal
    argv = ["make-data", str(tmp_path / "b"), "--family", "flux", "--channels", "2"]
    distill_main(argv)
    assert "would refuse" in caplog.text and "channels" in caplog.text
    with pytest.raises(SystemExit):  # ... unless the data is declared for train --tiny
        distill_main([argv[0], str(tmp_path / "c"), *argv[2:], "--tiny"])
    assert "train --tiny would refuse FLUX data" in capsys.readouterr().err
