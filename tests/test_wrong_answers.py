"""The silent wrong answers of the contracts issue, section 1, one test (or more) per case.

Each test failed on the code before the fix: it names the case it covers (1.1 to 1.8).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from torch import nn

from mfcore.jvp import total_derivative
from mfcore.losses import (
    AdaptiveWeight,
    FlowMatchingLoss,
    MeanFlowLoss,
    per_sample_sq_error,
    sample_path,
)
from mfcore.path import FlowPoint
from mfcore.targets import (
    DifferentialTarget,
    SplitTarget,
    TeacherODETarget,
    differential_target,
    split_target,
    teacher_ode_target,
)
from mfcore.time import shifted_grid, uniform_grid
from mfcore.toys.train import ToyConfig
from mfcore.toys.train import main as toy_main
from mfcore.warmup import WarmupTarget
from tests._nets import MLPStudent

BF16, F32, F64 = torch.bfloat16, torch.float32, torch.float64


def decay(z, t):
    """``v = -z``: the ODE from t to r scales the state by ``exp(t - r)``."""
    return -z


def exact_decay_u(z, r, t):
    """The exact average velocity of :func:`decay` over ``[r, t]``, in float64."""
    gap = (t.double() - r.double())[:, None]
    return z.double() * (1 - torch.exp(gap)) / gap


# --------------------------------------------------------------------------- 1.1 bf16 targets


def test_1_1_bf16_teacher_ode_target_reproduction():
    torch.manual_seed(0)
    z = torch.randn(4, 2)
    r, t = torch.full((4,), 0.49), torch.full((4,), 0.5)
    got = teacher_ode_target(decay, z.to(BF16), r, t)
    ref = teacher_ode_target(decay, z.to(BF16).float(), r, t)  # the same start state in fp32
    assert got.dtype == F32  # the secant is never rounded to bf16
    # only the teacher's bf16 evaluations differ: a bf16 rounding of v, not of the secant
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-3)
    exact = exact_decay_u(z.to(BF16), r, t).float()
    torch.testing.assert_close(got, exact, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("gap", [1e-2, 1e-3, 1e-4])
def test_1_1_bf16_short_intervals_are_not_zero(gap):
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    t = torch.rand(64, generator=torch.Generator().manual_seed(2)) * 0.8 + 0.1
    r = t - gap
    got = teacher_ode_target(decay, z.to(BF16), r, t, steps=2)
    exact = exact_decay_u(z.to(BF16), r, t)
    rel = (got.double() - exact).norm() / exact.norm()
    assert rel < 1e-2, rel


@pytest.mark.parametrize("pieces", ["first", "both", "none"])
def test_1_1_bf16_split_target_keeps_the_split_point_in_fp32(pieces):
    torch.manual_seed(3)
    z = torch.randn(16, 2)
    t = torch.full((16,), 0.6)
    r, s = t - 1e-3, t - 5e-4

    def student(z, r, t):  # the exact average velocity, as a student
        return exact_decay_u(z, r, t).to(z.dtype)

    v = decay(z, t)
    got = split_target(student, decay, z.to(BF16), r, t, s, v.to(BF16), teacher_pieces=pieces)
    exact = exact_decay_u(z.to(BF16), r, t)
    assert got.dtype == F32
    assert (got.double() - exact).norm() / exact.norm() < 2e-2


def test_1_1_split_target_object_in_bf16():
    torch.manual_seed(4)
    z = torch.randn(8, 2).to(BF16)
    t = torch.full((8,), 0.5)
    r = t - 1e-3
    out = SplitTarget("both", teacher_steps=2)(
        lambda z, r, t: torch.zeros_like(z), FlowPoint(z, r, t, decay(z, t)), teacher=decay
    )
    exact = exact_decay_u(z, r, t)
    assert (out.target.double() - exact).norm() / exact.norm() < 2e-2


def test_1_1_half_precision_times_are_differenced_in_the_compute_dtype():
    z = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    t = torch.linspace(0.55, 0.95, 8).half()
    r = torch.linspace(0.01, 0.3, 8).half()
    got = teacher_ode_target(decay, z, r, t, steps=4)
    ref = teacher_ode_target(decay, z, r.double(), t.double(), steps=4)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    u, dudt, v = torch.randn(3, 8, 2, dtype=F64).unbind(0)
    torch.testing.assert_close(
        differential_target(u, dudt, v, r, t),
        differential_target(u, dudt, v, r.double(), t.double()),
        rtol=1e-14,
        atol=1e-14,
    )


def test_1_1_teacher_ode_target_object_gives_fp32_targets_for_bf16_data():
    torch.manual_seed(6)
    z = torch.randn(8, 2).to(BF16)
    t = torch.full((8,), 0.5)
    r = t - 1e-3
    out = TeacherODETarget(steps=2)(
        lambda z, r, t: torch.zeros_like(z), FlowPoint(z, r, t, decay(z, t)), teacher=decay
    )
    assert out.target.dtype == F32
    exact = exact_decay_u(z, r, t)
    assert (out.target.double() - exact).norm() / exact.norm() < 1e-2


# --------------------------------------------------------------------------- 1.2 shapes


def test_1_2_discrete_targets_check_the_students_output_shape():
    z, t = torch.randn(4, 2), torch.full((4,), 0.5)
    r = t - 0.1

    def narrow(z, r, t):
        return z[:, :1]  # (B, 1): would broadcast against a (B, 2) target

    for target in (TeacherODETarget(steps=1), SplitTarget("both")):
        with pytest.raises(ValueError, match="student's output"):
            target(narrow, FlowPoint(z, r, t, decay(z, t)), teacher=decay)


def test_1_2_a_weighting_must_return_one_weight_per_sample():
    x = torch.randn(4, 2)

    def column(sq_err, r, t):
        return torch.ones(sq_err.shape[0], 1)  # (B, 1)

    student = MLPStudent(2)
    loss = MeanFlowLoss(target=TeacherODETarget(steps=1), weighting=column)
    with pytest.raises(ValueError, match=r"weighting must return a \(4,\) tensor"):
        loss(student, x, teacher=decay)
    fm = FlowMatchingLoss(weighting=column)
    with pytest.raises(ValueError, match="weighting"):
        fm(lambda z, t: z, x)


# --------------------------------------------------------------------------- 1.3 the path


def test_1_3_sample_path_validates():
    x, noise = torch.randn(4, 2), torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        sample_path(x, noise, torch.full((4,), 3.0))
    with pytest.raises(ValueError, match="noise must have the shape"):
        sample_path(x, torch.randn(4, 1), torch.rand(4))
    with pytest.raises(TypeError, match="x must have a floating-point dtype"):
        sample_path(torch.ones(4, 2, dtype=torch.int64), noise, torch.rand(4))


def test_1_3_per_sample_sq_error_validates():
    with pytest.raises(ValueError, match="target must have the shape"):
        per_sample_sq_error(torch.randn(4, 2), torch.randn(4, 1))
    with pytest.raises(TypeError, match="pred must have a floating-point dtype"):
        per_sample_sq_error(torch.ones(4, 2, dtype=torch.int64), torch.randn(4, 2))


# --------------------------------------------------------------------------- 1.4 infinities


@pytest.mark.parametrize("kwargs", [dict(c=float("inf")), dict(p=float("inf")), dict(c=0.0)])
def test_1_4_adaptive_weight_refuses_infinities(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AdaptiveWeight(**kwargs)


def test_1_4_infinite_fd_step_is_refused():
    with pytest.raises(ValueError, match="fd_step"):
        DifferentialTarget("fd", fd_step=float("inf"))
    z, t = torch.randn(2, 2), torch.full((2,), 0.5)
    with pytest.raises(ValueError, match="fd_step"):
        total_derivative(MLPStudent(2), z, t - 0.1, t, z, method="fd", fd_step=float("inf"))
    for name in ("clamp", "tangent_norm"):
        with pytest.raises(ValueError, match=name):
            DifferentialTarget(**{name: float("nan")})


# --------------------------------------------------------------------------- 1.5 toy config

BAD_TOY_FIELDS = [
    ("grad_clip", -1.0),
    ("grad_clip", 0.0),
    ("lr_final", float("inf")),
    ("align_weight", float("inf")),
    ("point_scale", float("nan")),
    ("grid_fraction", 5.0),
    ("align_start", -5),
    ("critic_lead", -50),
]


@pytest.mark.parametrize(("field", "value"), BAD_TOY_FIELDS)
def test_1_5_toy_config_refuses(field, value):
    with pytest.raises(ValueError, match=field):
        ToyConfig(**{field: value}).validate()


def test_1_5_toy_cli_gives_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        toy_main(["--steps", "-3", "--out", "none"])
    assert exc.value.code == 2
    assert "steps" in capsys.readouterr().err


def test_1_5_negative_steps_are_refused():
    z, t = torch.randn(2, 2), torch.full((2,), 0.5)
    warm = WarmupTarget(TeacherODETarget(steps=1), switch_step=3)
    with pytest.raises(ValueError, match="step must be >= 0"):
        warm(MLPStudent(2), FlowPoint(z, t - 0.1, t, decay(z, t)), teacher=decay, step=-1)
    loss = MeanFlowLoss(target=TeacherODETarget(steps=1))
    with pytest.raises(ValueError, match="step must be >= 0"):
        loss(MLPStudent(2), z, teacher=decay, step=-1)


def test_1_5_a_time_sampler_out_of_range_is_refused_at_once():
    calls = []

    def teacher(z, t):
        calls.append(1)
        return -z

    def bad_pairs(batch, **kw):
        t = torch.full((batch,), 1.5)
        return t - 0.2, t

    loss = MeanFlowLoss(time_sampler=bad_pairs, target=TeacherODETarget(steps=1))
    with pytest.raises(ValueError, match="time_sampler"):
        loss(MLPStudent(2), torch.randn(4, 2), teacher=teacher)
    assert not calls  # refused before the teacher ran

    def backwards(batch, **kw):
        return torch.full((batch,), 0.6), torch.full((batch,), 0.4)

    with pytest.raises(ValueError, match="time_sampler"):
        MeanFlowLoss(time_sampler=backwards)(MLPStudent(2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="time sampler"):
        FlowMatchingLoss(time_sampler=lambda b, **kw: torch.full((b,), 1.5))(
            lambda z, t: z, torch.randn(4, 2)
        )


# --------------------------------------------------------------------------- 1.6 flux_distill


@pytest.fixture
def flux_data(tmp_path):
    from mfcore.adapters.flux_distill import make_synthetic_data

    make_synthetic_data(tmp_path / "data", num_files=1, per_file=2, height=4, width=4, seq_len=4)
    return tmp_path / "data"


def _flux_argv(tmp_path, data, *extra):
    argv = ["train", "--tiny", "--data", str(data), "--output", str(tmp_path / "out")]
    argv += ["--device", "cpu", "--weights-dtype", "fp32", "--no-progress", "--lora-rank", "2"]
    argv += ["--warmup-ode-steps", "1", "--batch-size", "1"]
    return argv + list(extra)


def _usage_error(argv, capsys) -> str:
    from mfcore.adapters.flux_distill import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "name"),
    [
        (["--keep-checkpoints", "0"], "keep_checkpoints"),
        (["--grad-clip", "nan"], "grad_clip"),
        (["--grad-clip", "0"], "grad_clip"),
        (["--grad-clip", "-1"], "grad_clip"),
        (["--device", "nope"], "device"),
    ],
)
def test_1_6_flux_distill_refuses(tmp_path, flux_data, capsys, flags, name):
    err = _usage_error(_flux_argv(tmp_path, flux_data, *flags), capsys)
    assert name in err and "Traceback" not in err


def test_1_6_make_data_refuses_zero_samples(tmp_path, capsys):
    err = _usage_error(["make-data", str(tmp_path / "d"), "--per-file", "0"], capsys)
    assert "per_file" in err


def test_1_6_resume_logs_each_step_once_and_a_torn_checkpoint_is_named(tmp_path, flux_data, capsys):
    from mfcore.adapters.flux_distill import latest_checkpoint, main

    common = ["--checkpoint-every", "2", "--warmup-steps", "1"]
    assert main(_flux_argv(tmp_path, flux_data, "--steps", "3", *common)) == 0
    # a kill after step 3's log line but before its checkpoint: drop the step-3 checkpoint
    ckpt = latest_checkpoint(tmp_path / "out")
    assert ckpt.endswith("step-0000003")
    shutil.rmtree(ckpt)
    assert main(_flux_argv(tmp_path, flux_data, "--steps", "4", "--resume", *common)) == 0
    with open(os.path.join(tmp_path, "out", "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3, 4]
    # truncate every checkpoint's student file: a named error, not a SafetensorError (with
    # one intact checkpoint left, the resume falls back to it: test_checkpoint_faults.py)
    root = os.path.join(tmp_path, "out", "checkpoints")
    for name in os.listdir(root):
        path = os.path.join(root, name, "student.safetensors")
        with open(path, "rb") as f:
            head = f.read(100)
        with open(path, "wb") as f:
            f.write(head)
    err = _usage_error(_flux_argv(tmp_path, flux_data, "--steps", "5", "--resume", *common), capsys)
    assert "student.safetensors" in err and "corrupt" in err


# --------------------------------------------------------------------------- 1.7 grids


def test_1_7_half_precision_grids_never_repeat_a_time():
    with pytest.raises(ValueError, match="not representable"):
        uniform_grid(1000, dtype=BF16)
    with pytest.raises(ValueError, match="not representable"):
        shifted_grid(1000, shift=3.0, dtype=torch.float16)
    for steps in (1, 2, 4, 8):  # a few-step grid is exact in bf16
        grid = uniform_grid(steps, dtype=BF16)
        assert bool((grid[1:] < grid[:-1]).all())
    grid = uniform_grid(1000, dtype=F32)
    assert bool((grid[1:] < grid[:-1]).all())


# --------------------------------------------------------------------------- 1.8 dropout


class DropoutStudent(nn.Module):
    """An MLP student with dropout: its masks come from the global RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Dropout(0.5), nn.Linear(64, 2))

    def forward(self, z, r, t):
        return self.net(torch.cat([z, r[:, None], t[:, None]], dim=1))


def test_1_8_two_forward_differential_target_uses_one_dropout_mask():
    torch.manual_seed(0)
    student = DropoutStudent().double().train()
    z = torch.randn(16, 2, dtype=F64)
    t = torch.full((16,), 0.7, dtype=F64)
    r, v = t - 0.3, torch.randn(16, 2, dtype=F64)
    torch.manual_seed(1)
    out = DifferentialTarget("func", single_forward=False)(student, FlowPoint(z, r, t, v))
    torch.manual_seed(1)
    u, dudt = total_derivative(student, z, r, t, v, method="func")
    torch.testing.assert_close(out.pred.detach(), u, rtol=0, atol=0)
    torch.testing.assert_close(out.target, (v - 0.3 * dudt), rtol=1e-12, atol=1e-12)


def test_1_8_finite_differences_take_one_dropout_mask():
    torch.manual_seed(0)
    student = DropoutStudent().double().train()
    z = torch.randn(16, 2, dtype=F64)
    t = torch.full((16,), 0.7, dtype=F64)
    r, v = t - 0.3, torch.randn(16, 2, dtype=F64)
    torch.manual_seed(2)
    u_fd, dudt_fd = total_derivative(student, z, r, t, v, method="fd")
    torch.manual_seed(2)
    u_ex, dudt_ex = total_derivative(student, z, r, t, v, method="func")
    torch.testing.assert_close(u_fd, u_ex, rtol=0, atol=0)
    torch.testing.assert_close(dudt_fd, dudt_ex, rtol=1e-6, atol=1e-8)
