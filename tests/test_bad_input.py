"""Bad input across the public API and both command lines: one table, one case per row.

Each row is a call that must fail loudly, at the public entry, with a ``ValueError`` or
``TypeError`` whose message names the argument (the row's pattern), or, for a command
line, with an argparse usage error: exit status 2, one ``error:`` line naming the argument,
no traceback. None may pass silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import mfcore.toys.train as toy
from mfcore.arcflow import ArcFlowDistillationLoss, TeacherMixSchedule, sample_arcflow
from mfcore.critics import (
    AlignmentLoss,
    FakeVelocityCritic,
    KernelCritic,
    MeanFlowCritic,
    kernel_discrepancy,
    renoise,
)
from mfcore.guidance import ClassifierFreeGuidance, MeanFlowGuidance, cfg_velocity
from mfcore.jvp import total_derivative
from mfcore.losses import (
    AdaptiveWeight,
    FlowMatchingLoss,
    MeanFlowLoss,
    per_sample_sq_error,
    sample_path,
)
from mfcore.path import FlowPoint
from mfcore.solvers import odeint, sample_meanflow, sample_teacher
from mfcore.targets import (
    DifferentialTarget,
    SplitTarget,
    TeacherODETarget,
    differential_target,
    split_target,
    teacher_ode_target,
)
from mfcore.time import (
    ClampedPairSampler,
    LogitNormalTime,
    TimePairSampler,
    UniformTime,
    exponential_shift,
    resolution_shift_mu,
    shift_time,
    shifted_grid,
    uniform_grid,
)
from mfcore.toys.gmm import preset
from mfcore.toys.nets import VelocityMLP
from mfcore.warmup import SwitchGate, SwitchGuard, SwitchRollback, WarmupTarget
from tests._nets import MLPStudent

B, D = 4, 2
Z = torch.randn(B, D, generator=torch.Generator().manual_seed(0))
R, T = torch.full((B,), 0.25), torch.full((B,), 0.75)
V = -Z
STUDENT = MLPStudent(D)


def teacher(z, t):
    return -z


def u_fn(z, r, t):
    return -z


@dataclass(frozen=True)
class Case:
    """``call()`` must raise ``error`` (``"usage"``: an argparse usage error) matching
    ``names``, a regex naming the argument."""

    id: str
    call: Callable[..., object]
    error: type[Exception] | str
    names: str
    needs_dir: bool = False


def api(case_id: str, call, error, names) -> Case:
    return Case(case_id, call, error, names)


def toy_cli(case_id: str, argv: list[str], names: str) -> Case:
    return Case(
        f"mfcore-toy {case_id}",
        lambda tmp: toy.main([*argv, "--out", str(tmp)]),
        "usage",
        names,
        True,
    )


def _flux_train(tmp, *flags: str) -> int:
    from mfcore.adapters.flux_distill import main, make_synthetic_data

    data = tmp / "data"
    make_synthetic_data(data, num_files=1, per_file=2, height=4, width=4, seq_len=4)
    argv = ["train", "--tiny", "--data", str(data), "--output", str(tmp / "out")]
    return main([*argv, "--device", "cpu", "--no-progress", *flags])


def _distill_train(tmp, *flags: str) -> int:
    from mfcore.adapters.distill_cli import main
    from mfcore.adapters.flux_distill import make_synthetic_data

    data = tmp / "data"
    make_synthetic_data(data, num_files=1, per_file=2, height=4, width=4, seq_len=4)
    argv = ["train", "--tiny", "--family", "flux", "--data", str(data), "--output", str(tmp / "o")]
    return main([*argv, "--device", "cpu", "--no-progress", *flags])


def _distill_main(argv):
    from mfcore.adapters.distill_cli import main

    return main(argv)


def flux_cli(case_id: str, call, names: str) -> Case:
    return Case(f"flux_distill {case_id}", call, "usage", names, True)


def _flux_main(argv):
    from mfcore.adapters.flux_distill import main

    return main(argv)


def _bad_pairs(batch, **kw):
    t = torch.full((batch,), 1.5)
    return t - 0.2, t


CASES = [
    # ------------------------------------------------------------------ time
    api("UniformTime low > high", lambda: UniformTime(0.5, 0.2), ValueError, "low and high"),
    api("LogitNormalTime std 0", lambda: LogitNormalTime(std=0.0), ValueError, "std"),
    api("LogitNormalTime mean str", lambda: LogitNormalTime(mean="0"), TypeError, "mean"),
    api(
        "TimePairSampler equal_fraction 1.5",
        lambda: TimePairSampler(equal_fraction=1.5),
        ValueError,
        "equal_fraction",
    ),
    api(
        "ClampedPairSampler equal_prob < 0",
        lambda: ClampedPairSampler(equal_prob=-0.1),
        ValueError,
        "equal_prob",
    ),
    api("TimePairSampler t_sampler 3", lambda: TimePairSampler(3), TypeError, "t_sampler"),
    api("sampler batch_size 0", lambda: UniformTime()(0), ValueError, "batch_size"),
    api("sampler int dtype", lambda: UniformTime()(4, dtype=torch.int64), TypeError, "dtype"),
    api("sampler bad device", lambda: UniformTime()(4, device="nope"), ValueError, "device"),
    api("shift_time t 1.5", lambda: shift_time(torch.tensor([1.5]), 2.0), ValueError, "t must"),
    api("shift_time shift 0", lambda: shift_time(torch.tensor([0.5]), 0.0), ValueError, "shift"),
    api("exponential_shift mu 1000", lambda: exponential_shift(T, 1000.0), ValueError, "mu"),
    api("uniform_grid steps 0", lambda: uniform_grid(0), ValueError, "steps"),
    api("shifted_grid no shift", lambda: shifted_grid(4), ValueError, "shift and mu"),
    api(
        "resolution_shift_mu max < base",
        lambda: resolution_shift_mu(256, max_seq_len=100),
        ValueError,
        "max_seq_len",
    ),
    # ------------------------------------------------------------------ solvers
    api("odeint steps 0", lambda: odeint(teacher, Z, T, R, 0), ValueError, "steps"),
    api(
        "odeint method rk5", lambda: odeint(teacher, Z, T, R, 4, method="rk5"), ValueError, "method"
    ),
    api("odeint t_end batch", lambda: odeint(teacher, Z, T, R[:3], 4), ValueError, "t_end"),
    api("odeint v_fn 3", lambda: odeint(3, Z, T, R, 4), TypeError, "v_fn"),
    api(
        "sample_teacher half grid",
        lambda: sample_teacher(teacher, Z, grid=torch.tensor([1.0, 0.5])),
        ValueError,
        "grid",
    ),
    api(
        "sample_teacher shift -1",
        lambda: sample_teacher(teacher, Z, 4, shift=-1.0),
        ValueError,
        "shift",
    ),
    api(
        "sample_meanflow steps vs grid",
        lambda: sample_meanflow(u_fn, Z, 2, grid=uniform_grid(4)),
        ValueError,
        "steps",
    ),
    api("sample_meanflow cond list", lambda: sample_meanflow(u_fn, Z, cond=[1]), TypeError, "cond"),
    api(
        "sample_meanflow callback 3",
        lambda: sample_meanflow(u_fn, Z, callback=3),
        TypeError,
        "callback",
    ),
    # ------------------------------------------------------------------ jvp
    api(
        "total_derivative method",
        lambda: total_derivative(u_fn, Z, R, T, V, method="numeric"),
        ValueError,
        "method",
    ),
    api("total_derivative r > t", lambda: total_derivative(u_fn, Z, T, R, V), ValueError, "r <= t"),
    api(
        "total_derivative v shape",
        lambda: total_derivative(u_fn, Z, R, T, V[:, :1]),
        ValueError,
        "v must have",
    ),
    api(
        "total_derivative fd_step 0",
        lambda: total_derivative(u_fn, Z, R, T, V, method="fd", fd_step=0.0),
        ValueError,
        "fd_step",
    ),
    # ------------------------------------------------------------------ targets
    api(
        "differential_target dudt",
        lambda: differential_target(Z, Z[:2], V, R, T),
        ValueError,
        "dudt",
    ),
    api(
        "teacher_ode_target steps 0",
        lambda: teacher_ode_target(teacher, Z, R, T, steps=0),
        ValueError,
        "steps",
    ),
    api(
        "teacher_ode_target method",
        lambda: teacher_ode_target(teacher, Z, R, T, method="rk3"),
        ValueError,
        "method",
    ),
    api(
        "teacher_ode_target t 1.5",
        lambda: teacher_ode_target(teacher, Z, R, T + 0.75),
        ValueError,
        "t must lie",
    ),
    api("TeacherODETarget method", lambda: TeacherODETarget(method="dopri5"), ValueError, "method"),
    api("SplitTarget pieces", lambda: SplitTarget("all"), ValueError, "teacher_pieces"),
    api(
        "split_target no teacher",
        lambda: split_target(u_fn, None, Z, R, T, (R + T) / 2, V),
        ValueError,
        "teacher_pieces",
    ),
    api(
        "split_target s > t",
        lambda: split_target(u_fn, teacher, Z, R, T, T + 0.1, V),
        ValueError,
        "s must satisfy s <= t",
    ),
    api(
        "DifferentialTarget jvp_method",
        lambda: DifferentialTarget("numeric"),
        ValueError,
        "jvp_method",
    ),
    api(
        "DifferentialTarget clamp < 0", lambda: DifferentialTarget(clamp=-1.0), ValueError, "clamp"
    ),
    api(
        "DifferentialTarget tangent_norm nan",
        lambda: DifferentialTarget(tangent_norm=math.nan),
        ValueError,
        "tangent_norm",
    ),
    # ------------------------------------------------------------------ warm-up switch
    api(
        "WarmupTarget differential as discrete",
        lambda: WarmupTarget(DifferentialTarget(), switch_step=3),
        TypeError,
        "discrete",
    ),
    api(
        "WarmupTarget switch_step -1",
        lambda: WarmupTarget(TeacherODETarget(), switch_step=-1),
        ValueError,
        "switch_step",
    ),
    api(
        "WarmupTarget ema 1",
        lambda: WarmupTarget(TeacherODETarget(), switch_step=3, ema=1.0),
        ValueError,
        "ema",
    ),
    api(
        "WarmupTarget gate without every",
        lambda: WarmupTarget(TeacherODETarget(), gate=SwitchGate(), every=None),
        ValueError,
        "every",
    ),
    api(
        "WarmupTarget edges unordered",
        lambda: WarmupTarget(TeacherODETarget(), switch_step=1, edges=(0.0, 0.5, 0.4, 1.0)),
        ValueError,
        "edges",
    ),
    api(
        "WarmupTarget step -1",
        lambda: WarmupTarget(TeacherODETarget(), switch_step=3)(
            STUDENT, FlowPoint(Z, R, T, V), teacher=teacher, step=-1
        ),
        ValueError,
        "step",
    ),
    api(
        "SwitchRollback.observe non-mapping",
        lambda: SwitchRollback(torch.optim.SGD(STUDENT.parameters(), lr=0.1)).observe(["x"]),
        TypeError,
        "metrics must be a mapping",
    ),
    api("SwitchGate rho_max 0", lambda: SwitchGate(rho_max=0.0), ValueError, "rho_max"),
    api("SwitchGuard patience 0", lambda: SwitchGuard(patience=0), ValueError, "patience"),
    # ------------------------------------------------------------------ losses
    api("AdaptiveWeight p < 0", lambda: AdaptiveWeight(p=-1.0), ValueError, "p must"),
    api("AdaptiveWeight c inf", lambda: AdaptiveWeight(c=math.inf), ValueError, "c must"),
    api("MeanFlowLoss target object", lambda: MeanFlowLoss(target=object()), TypeError, "target"),
    api(
        "MeanFlowLoss time_sampler 3",
        lambda: MeanFlowLoss(time_sampler=3),
        TypeError,
        "time_sampler",
    ),
    api("MeanFlowLoss weighting 3", lambda: MeanFlowLoss(weighting=3), TypeError, "weighting"),
    api("MeanFlowLoss r without t", lambda: MeanFlowLoss()(STUDENT, Z, r=R), ValueError, "r and t"),
    api("MeanFlowLoss r > t", lambda: MeanFlowLoss()(STUDENT, Z, r=T, t=R), ValueError, "r <= t"),
    api(
        "MeanFlowLoss noise shape",
        lambda: MeanFlowLoss()(STUDENT, Z, noise=Z[:, :1]),
        ValueError,
        "noise",
    ),
    api("MeanFlowLoss int x", lambda: MeanFlowLoss()(STUDENT, Z.long()), TypeError, "x must"),
    api("MeanFlowLoss step -1", lambda: MeanFlowLoss()(STUDENT, Z, step=-1), ValueError, "step"),
    api(
        "MeanFlowLoss sampler t 1.5",
        lambda: MeanFlowLoss(_bad_pairs)(STUDENT, Z),
        ValueError,
        "time_sampler",
    ),
    api(
        "MeanFlowLoss weighting (B, 1)",
        lambda: MeanFlowLoss(weighting=lambda sq, r, t: sq[:, None])(STUDENT, Z),
        ValueError,
        "weighting",
    ),
    api(
        "MeanFlowLoss cond_drop unguided",
        lambda: MeanFlowLoss()(STUDENT, Z, cond_drop=torch.zeros(B, dtype=torch.bool)),
        ValueError,
        "cond_drop",
    ),
    api(
        "MeanFlowLoss teacher output shape",
        lambda: MeanFlowLoss()(STUDENT, Z, teacher=lambda z, t: z[:, :1]),
        ValueError,
        "teacher output",
    ),
    api(
        "MeanFlowLoss empty batch",
        lambda: MeanFlowLoss()(STUDENT, Z[:0], r=R[:0], t=T[:0]),
        ValueError,
        "x is an empty batch",
    ),
    api("MeanFlowLoss (B,) data", lambda: MeanFlowLoss()(u_fn, Z[:, 0]), ValueError, "x must"),
    api(
        "FlowMatchingLoss empty batch",
        lambda: FlowMatchingLoss()(teacher, Z[:0], t=T[:0]),
        ValueError,
        "x is an empty batch",
    ),
    api(
        "FlowMatchingLoss (B,) data",
        lambda: FlowMatchingLoss()(teacher, Z[:, 0]),
        ValueError,
        "x must",
    ),
    api("sample_path t 1.5", lambda: sample_path(Z, Z, T + 0.75), ValueError, "t must lie"),
    api("per_sample_sq_error target", lambda: per_sample_sq_error(Z, Z[:1]), ValueError, "target"),
    api(
        "FlowMatchingLoss t batch",
        lambda: FlowMatchingLoss()(teacher, Z, t=T[:2]),
        ValueError,
        "t must",
    ),
    api(
        "FlowMatchingLoss model output",
        lambda: FlowMatchingLoss()(lambda z, t: z[:, :1], Z),
        ValueError,
        "model output",
    ),
    # ------------------------------------------------------------------ guidance
    api(
        "MeanFlowGuidance omega 0",
        lambda: MeanFlowGuidance(0.0, uncond={"y": 0}, label_dropout=0.0),
        ValueError,
        "omega",
    ),
    api(
        "MeanFlowGuidance kappa 1",
        lambda: MeanFlowGuidance(1.0, 1.0, uncond={"y": 0}, label_dropout=0.0),
        ValueError,
        "kappa",
    ),
    api(
        "MeanFlowGuidance uncond 3",
        lambda: MeanFlowGuidance(1.0, uncond=3, label_dropout=0.0),
        TypeError,
        "uncond",
    ),
    api(
        "MeanFlowGuidance t_max < t_min",
        lambda: MeanFlowGuidance(1.0, uncond={}, t_min=0.8, t_max=0.2, label_dropout=0.0),
        ValueError,
        "t_max",
    ),
    api(
        "MeanFlowGuidance label_dropout 1",
        lambda: MeanFlowGuidance(1.0, uncond={}, label_dropout=1.0),
        ValueError,
        "label_dropout",
    ),
    api("cfg_velocity scale nan", lambda: cfg_velocity(V, Z, math.nan), ValueError, "scale"),
    api(
        "ClassifierFreeGuidance scale inf",
        lambda: ClassifierFreeGuidance(teacher, math.inf, uncond={}),
        ValueError,
        "scale",
    ),
    # ------------------------------------------------------------------ critics
    api("AlignmentLoss critic object", lambda: AlignmentLoss(object()), TypeError, "critic"),
    api(
        "AlignmentLoss half grid",
        lambda: AlignmentLoss(KernelCritic(), grid=torch.tensor([1.0, 0.5])),
        ValueError,
        "grid",
    ),
    api(
        "AlignmentLoss critic_updates 0",
        lambda: AlignmentLoss(KernelCritic(), critic_updates=0),
        ValueError,
        "critic_updates",
    ),
    api(
        "AlignmentLoss reference shape",
        lambda: AlignmentLoss(KernelCritic()).student_loss(u_fn, Z, reference=Z[:3]),
        ValueError,
        "reference",
    ),
    api(
        "AlignmentLoss no teacher",
        lambda: AlignmentLoss(FakeVelocityCritic(VelocityMLP())).student_loss(u_fn, Z),
        ValueError,
        "needs a teacher",
    ),
    api(
        "AlignmentLoss noise list",
        lambda: AlignmentLoss(KernelCritic()).critic_step(u_fn, [1.0]),
        TypeError,
        "noise",
    ),
    api("KernelCritic kind", lambda: KernelCritic("wasserstein"), ValueError, "kind"),
    api(
        "KernelCritic no bandwidths", lambda: KernelCritic(bandwidths=()), ValueError, "bandwidths"
    ),
    api("FakeVelocityCritic lambda", lambda: FakeVelocityCritic(teacher), TypeError, "fake"),
    api(
        "MeanFlowCritic method",
        lambda: MeanFlowCritic(VelocityMLP(), method="rk9"),
        ValueError,
        "method",
    ),
    api("renoise from r = 1", lambda: renoise(Z, T / T, T / T, Z), ValueError, "r must be < 1"),
    api(
        "kernel_discrepancy one point", lambda: kernel_discrepancy(Z[:1], Z), ValueError, "a and b"
    ),
    # ------------------------------------------------------------------ arcflow
    api("TeacherMixSchedule start 1.5", lambda: TeacherMixSchedule(start=1.5), ValueError, "start"),
    api(
        "ArcFlowDistillationLoss points 0",
        lambda: ArcFlowDistillationLoss(points_per_step=0),
        ValueError,
        "points_per_step",
    ),
    api(
        "ArcFlowDistillationLoss weighting 3",
        lambda: ArcFlowDistillationLoss(weighting=3),
        TypeError,
        "weighting",
    ),
    api(
        "sample_arcflow substeps 0",
        lambda: sample_arcflow(u_fn, Z, substeps=0),
        ValueError,
        "substeps",
    ),
    # ------------------------------------------------------------------ toys (Python)
    api("toy run steps 0", lambda: toy.run({"steps": 0}), ValueError, "steps"),
    api(
        "toy grad_clip < 0",
        lambda: toy.ToyConfig(grad_clip=-1.0).validate(),
        ValueError,
        "grad_clip",
    ),
    api(
        "toy align_weight inf",
        lambda: toy.ToyConfig(align_weight=math.inf).validate(),
        ValueError,
        "align_weight",
    ),
    api("toy preset name", lambda: preset("ring9"), ValueError, "name"),
    # ------------------------------------------------------------------ mfcore-toy
    toy_cli("--steps 0", ["--steps", "0"], "steps"),
    toy_cli("--lr nan", ["--lr", "nan"], "lr"),
    toy_cli("--preset ring9", ["--preset", "ring9"], "preset"),
    toy_cli("--align-weight -1", ["--align-weight", "-1"], "align_weight"),
    toy_cli("--eval-samples 1", ["--eval-samples", "1"], "eval_samples"),
    toy_cli("--batch x", ["--batch", "x"], "batch"),
    toy_cli("--align-start -5", ["--align-start", "-5"], "align_start"),
    toy_cli("--target jvp", ["--target", "jvp"], "target"),
    toy_cli("--resume without a checkpoint", ["--resume", "--name", "none"], "resume"),
    toy_cli("--save-every -1", ["--save-every", "-1"], "save_every"),
    toy_cli("--threads 0", ["--threads", "0"], "threads"),
    toy_cli("--seed 2**70 past int64", ["--seed", str(2**70)], "seed"),
    api(
        "toy seed 2**70 past int64",
        lambda: toy.ToyConfig(seed=2**70).validate(),
        ValueError,
        "seed",
    ),
    # ------------------------------------------------------------------ flux_distill
    flux_cli(
        "--keep-checkpoints 0",
        lambda tmp: _flux_train(tmp, "--keep-checkpoints", "0"),
        "keep_checkpoints",
    ),
    flux_cli(
        "--guidance-scale nan",
        lambda tmp: _flux_train(tmp, "--guidance-scale", "nan"),
        "guidance_scale",
    ),
    flux_cli(
        "--true-cfg-scale inf",
        lambda tmp: _flux_train(tmp, "--true-cfg-scale", "inf"),
        "true_cfg_scale",
    ),
    flux_cli("--grad-clip nan", lambda tmp: _flux_train(tmp, "--grad-clip", "nan"), "grad_clip"),
    flux_cli(
        "make-data --per-file 0",
        lambda tmp: _flux_main(["make-data", str(tmp / "d"), "--per-file", "0"]),
        "per_file",
    ),
    flux_cli(
        "--seed 2**70 past int64",
        lambda tmp: _flux_train(tmp, "--seed", str(2**70)),
        "seed",
    ),
    flux_cli(
        "make-data --seed 2**70 past int64",
        lambda tmp: _flux_main(["make-data", str(tmp / "d"), "--seed", str(2**70)]),
        "seed",
    ),
    Case(
        "mfcore-distill --seed 2**70 past int64",
        lambda tmp: _distill_train(tmp, "--seed", str(2**70)),
        "usage",
        "seed",
        True,
    ),
    flux_cli(
        "make-data --height 5 that train refuses",
        lambda tmp: _flux_main(["make-data", str(tmp / "d"), "--height", "5"]),
        "height",
    ),
    Case(
        "mfcore-distill make-data hunyuanimage3 --vocab-size 8",
        lambda tmp: _distill_main(
            ["make-data", str(tmp / "d"), "--family", "hunyuanimage3", "--vocab-size", "8"]
        ),
        "usage",
        "vocab_size",
        True,
    ),
    flux_cli(
        "train without --data",
        lambda tmp: _flux_main(["train", "--tiny", "--output", str(tmp)]),
        "--data",
    ),
]


def test_the_table_is_large_and_its_ids_are_unique():
    assert len(CASES) >= 110
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_by_name(case, tmp_path, capsys):
    args = (tmp_path,) if case.needs_dir else ()
    if case.error == "usage":
        with pytest.raises(SystemExit) as exc:
            case.call(*args)
        err = capsys.readouterr().err
        assert exc.value.code == 2, err
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert len(errors) == 1 and "Traceback" not in err, err
        assert case.names.replace("-", "_") in errors[0].replace("-", "_"), errors[0]
    else:
        with pytest.raises(case.error, match=case.names):
            case.call(*args)
