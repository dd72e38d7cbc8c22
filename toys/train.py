"""The toy distillation: an exact Gaussian-mixture teacher into a small MeanFlow MLP student.

The seed method of arXiv 2605.17834 on a 2-D mixture where every answer is exact:

1. MeanFlow regression (:class:`mfcore.losses.MeanFlowLoss`) on ``(r, t)`` pairs, with the
   target chosen by ``target``: ``"warmup"`` is the warm-up switch
   (:class:`mfcore.warmup.WarmupTarget`: the discrete teacher-ODE target first, the
   differential (JVP) target after ``warmup_steps``), ``"discrete"`` keeps the teacher-ODE
   target throughout, ``"differential"`` uses the JVP target from scratch. The default is
   ``"discrete"``: on these toys the teacher-ODE target is exact and cheap, and switching to
   the differential target lowered the 1-step mode precision (docs/toys.md);
2. plus ``align_weight *`` trajectory distribution alignment
   (:class:`mfcore.critics.AlignmentLoss`) of the student's ``K``-step samples for each
   ``K`` in ``align_steps``, with a fake-velocity, mean-flow or kernel critic.

Run ``python -m mfcore.toys.train`` (or ``mfcore-toy``) with no argument for the default
config; flags override it (``--help``). It writes ``<out>/<name>/metrics.json`` and PNG
figures, shows a progress bar and prints a summary table. :func:`run` does the same from
Python for any :class:`~mfcore.toys.gmm.GaussianMixture` teacher and returns the metrics.

Besides ``metrics.json`` a run writes the student's weights, ``student.safetensors``, and
its whole training state, ``checkpoint/`` (every ``save_every`` steps and at the end):
``--resume`` (``resume=True``) continues a run from there exactly as if it had not stopped.

``metrics.json`` holds ``teacher`` (a 100-step Heun solve: its NFE and metrics),
``data_floor`` (the metrics of a second data sample), ``student`` keyed by step count
(``"1"``, ``"2"``, ``"4"``), each with ``w2``, ``mmd``, ``nll``, ``mode_precision`` and
``mode_recall`` against the same fresh data sample, plus ``training`` (phase switch, wall
time, collapse) and ``config``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mfcore._checks import check_choice, check_int64, check_positive_int, check_real, cli_int
from mfcore.critics import AlignmentLoss, FakeVelocityCritic, KernelCritic, MeanFlowCritic
from mfcore.curricula import HalvingSpan, LinearSpan, SplitCurriculumTarget
from mfcore.fields import Target
from mfcore.jvp import JVP_METHODS
from mfcore.losses import AdaptiveWeight, MeanFlowLoss
from mfcore.path import FlowPoint
from mfcore.solvers import ODE_METHODS, sample_meanflow, sample_teacher
from mfcore.targets import DifferentialTarget, SplitTarget, TeacherODETarget
from mfcore.time import (
    GridPairSampler,
    LogitNormalTime,
    TimePairSampler,
    UniformTime,
    uniform_grid,
)
from mfcore.warmup import HANDOVERS, SwitchGate, SwitchGuard, SwitchRollback, WarmupTarget

from .derivative import derivative_loss
from .gmm import GaussianMixture, preset, presets
from .metrics import evaluate
from .nets import IntervalStudent, MeanFlowMLP, VelocityMLP, activation
from .probe import AverageVelocityProbe
from .teacher_net import TeacherNetConfig, fit_teacher_net, teacher_net_report

__all__ = ["ToyConfig", "run", "main", "read_checkpoint", "TARGETS", "CRITICS"]

logger = logging.getLogger(__name__)

TARGETS = ("warmup", "discrete", "differential")
SWITCHES = ("fixed", "gated")
DISCRETE = ("ode", "split")
CURRICULA = ("none", "alpha", "dmf")
TEACHERS = ("exact", "net")
INITS = ("random", "teacher")
TIMES = ("uniform", "logit_normal")
CRITICS = ("fake", "meanflow", "kernel", "none")
METRIC_KEYS = ("w2", "mmd", "nll", "mode_precision", "mode_recall")


@dataclass
class ToyConfig:
    """Everything a toy run needs; the defaults are the documented default run.

    Attributes:
        preset: teacher preset of :data:`mfcore.toys.gmm.presets` (ignored when :func:`run`
            gets a teacher).
        name: run name (folder under ``out_dir``); default: the preset's name.
        out_dir: where runs are written; ``None`` writes nothing.
        seed: seeds the networks, the data and every random draw.
        steps: optimiser steps of the student.
        batch: batch size of the MeanFlow loss and of the alignment.
        lr, lr_final: Adam learning rate, decayed on a cosine to ``lr_final``.
        hidden, depth, act: the student MLP (width, hidden layers, activation).
        point_features, point_scale: random Fourier features of the student's input points
            (:class:`~mfcore.toys.nets.FourierPoints`); they sharpen the 1-step map.
        equal_fraction: share of ``(r, t)`` pairs with ``r = t``.
        times: the distribution of the two times of a pair, ``"uniform"`` on [0, 1] or
            ``"logit_normal"`` (``time_mean``, ``time_std``; MeanFlow's and mfcore-distill's).
        grid_fraction: share of the pairs drawn as intervals of the ``eval_steps`` grids.
        target: ``"warmup"`` (discrete then differential), ``"discrete"`` or
            ``"differential"`` (from scratch).
        warmup_steps: step ``S`` of the switch for ``"warmup"`` (with ``switch="gated"``
            the earliest one). Every variant is also evaluated at ``S`` (1-step W2 and probe
            error), so a run can be judged against its own state there.
        blend_steps: after the switch, steps over which the target ramps linearly from the
            discrete to the differential one (``WarmupTarget(blend_steps=...)``).
        handover: how it ramps, ``"blend"`` (a mix of the two targets) or ``"gap"`` (the
            differential target on the short intervals first: the gap curriculum;
            ``WarmupTarget(handover=...)``).
        curriculum: ``"none"``, or a :class:`~mfcore.curricula.SplitCurriculumTarget` as the
            discrete target, its schedule running over ``warmup_steps`` (then held):
            ``"alpha"`` (alpha-Flow: the teacher's share of the interval from 1, flow
            matching, linearly to ``curriculum_end``) or ``"dmf"`` (Discrete MeanFlow, our
            reading: an absolute teacher step from 1, halved over ``curriculum_stages``
            stages). With ``target="warmup"`` the switch at ``warmup_steps`` then hands over
            to the differential target.
        switch: ``"fixed"`` (at ``warmup_steps``) or ``"gated"`` (also only once the
            targets agree: :class:`mfcore.warmup.SwitchGate`).
        guard: revert to the discrete target when the student drifts after the switch
            (:class:`mfcore.warmup.SwitchGuard`).
        gate_delta, gate_rho, gate_patience: the gate's thresholds and patience.
        guard_margin, guard_patience: the guard's allowed rise and patience.
        signal_every: cadence of the agreement signals, gate and guard checks.
        rollback: on a revert, also restore the student and optimiser saved at the switch.
        discrete: the discrete target, ``"ode"`` (teacher-ODE secant) or ``"split"``
            (:class:`~mfcore.targets.SplitTarget`: the teacher on ``[s, t]``, the
            stop-gradient student on ``[r, s]``, as SplitMeanFlow).
        discrete_steps, discrete_method: the teacher solve of the discrete target (per piece
            for ``"split"``).
        discrete_p: power of MeanFlow's adaptive weight on the discrete target (0: plain L2).
        adaptive_p: power of the adaptive weight on the differential target.
        jvp, fd_step, tangent_norm: the differential target's derivative (``"func"``,
            ``"autograd"`` or ``"fd"`` with its step) and tangent normalisation
            (:class:`~mfcore.targets.DifferentialTarget`).
        deriv_weight: weight of the derivative supervision during the discrete phase
            (:func:`mfcore.toys.derivative.derivative_loss`; 0: off).
        grad_clip: max gradient norm of the student (``None``: no clipping).
        teacher: ``"exact"`` (the mixture's exact velocity) or ``"net"`` (a
            :class:`~mfcore.toys.nets.VelocityMLP` fitted to it: the faithful setting).
        init: ``"random"`` or ``"teacher"`` (an :class:`~mfcore.toys.nets.IntervalStudent`
            copied from the teacher network, equal to it at init; needs ``teacher="net"``;
            the student then has the teacher's architecture, ``hidden``/``depth``/``act``).
        time_max_freq: highest frequency of the time features (student and teacher network).
        teacher_fit_steps: optimiser steps of the teacher network's fit.
        probe_every: steps between probe evaluations (:class:`~mfcore.toys.probe.
            AverageVelocityProbe`, against the exact average velocity) in the history.
        align: critic ``"fake"``, ``"meanflow"``, ``"kernel"`` or ``"none"``.
        align_weight: ``lambda`` of the alignment loss.
        align_steps: student step counts ``K`` that are aligned (one critic each).
        align_start: first step of critic training; the student's alignment starts
            ``critic_lead`` steps later.
        critic_lead: critic-only steps before the student feels the alignment.
        critic_updates: critic updates per student update (the two time scales).
        align_batch: noise samples per alignment step (``None``: ``batch``). The alignment
            is most of a step's cost; with one critic update on 128 samples the default run
            meets its bars in a third of the time of two updates on 256.
        critic_lr, critic_hidden: the critic's Adam learning rate and MLP width.
        critic_ode_steps: ODE steps of the mean-flow critic's transports.
        eval_samples: size of the evaluation samples (student, teacher, data).
        eval_steps: student step counts evaluated.
        teacher_steps: Heun steps of the reference teacher solve.
        figures: write PNG figures.
        progress: show a tqdm progress bar.
        save_every: steps between checkpoints of the whole training state in
            ``<run>/checkpoint/`` (0: only at the end); the student's weights are written to
            ``<run>/student.safetensors`` at the end. Nothing is written without ``out_dir``.
        resume: continue from ``<run>/checkpoint/`` (written with the same settings, but for
            ``progress``, ``figures`` and ``save_every``) exactly where it stopped.
        init_from: a run folder whose ``checkpoint/`` this run *branches* from: its student,
            optimiser, step, teacher evaluations and probe curve, on the same mixture, seed
            and network (the targets, the pairs and the random draws are this run's own).
            Several variants can so share one warm-up.
        stop_plateau: stop once the probe error fell by less than this fraction over the
            last ``plateau_window`` steps (checked at the probe steps from twice that on;
            ``None``: never): a warm-up run to convergence. ``training["converged_at"]``
            holds the step.
        plateau_window: see ``stop_plateau``; a multiple of ``probe_every``.
    """

    preset: str = "ring8"
    name: str | None = None
    out_dir: str | None = "runs"
    seed: int = 0
    steps: int = 2000
    batch: int = 256
    lr: float = 3e-3
    lr_final: float = 1e-4
    hidden: int = 256
    depth: int = 3
    act: str = "relu"
    point_features: int = 32
    point_scale: float = 2.0
    equal_fraction: float = 0.25
    times: str = "uniform"
    time_mean: float = -0.4
    time_std: float = 1.0
    grid_fraction: float = 0.5
    target: str = "discrete"
    warmup_steps: int = 1400
    blend_steps: int = 0
    handover: str = "blend"
    curriculum: str = "none"
    curriculum_end: float = 0.05
    curriculum_stages: int = 5
    switch: str = "fixed"
    guard: bool = True
    gate_delta: float = 0.1
    gate_rho: float = 1.5
    gate_patience: int = 3
    guard_margin: float = 0.25
    guard_patience: int = 2
    signal_every: int = 10
    rollback: bool = True
    discrete: str = "ode"
    discrete_steps: int = 16
    discrete_method: str = "heun"
    discrete_p: float = 0.0
    adaptive_p: float = 1.0
    jvp: str = "func"
    fd_step: float | None = None
    tangent_norm: float | None = None
    deriv_weight: float = 0.0
    grad_clip: float | None = 1.0
    teacher: str = "exact"
    init: str = "random"
    time_max_freq: float = 32.0
    teacher_fit_steps: int = 6000
    probe_every: int = 100
    align: str = "fake"
    align_weight: float = 0.3
    align_steps: tuple[int, ...] = (1, 2)
    align_start: int = 300
    critic_lead: int = 100
    critic_updates: int = 1
    align_batch: int | None = 128
    critic_lr: float = 1e-3
    critic_hidden: int = 128
    critic_ode_steps: int = 2
    eval_samples: int = 2000
    eval_steps: tuple[int, ...] = (1, 2, 4)
    teacher_steps: int = 100
    figures: bool = True
    progress: bool = True
    save_every: int = 500
    resume: bool = False
    init_from: str | None = None
    stop_plateau: float | None = None
    plateau_window: int = 1000

    def validate(self) -> ToyConfig:
        """Raise ``ValueError``/``TypeError`` naming a bad field; return ``self``."""
        check_choice("preset", self.preset, tuple(presets))
        check_choice("target", self.target, TARGETS)
        check_choice("align", self.align, CRITICS)
        check_choice("switch", self.switch, SWITCHES)
        check_choice("handover", self.handover, HANDOVERS)
        check_choice("curriculum", self.curriculum, CURRICULA)
        check_real("curriculum_end", self.curriculum_end, minimum=0.0, strict=True)
        if self.curriculum_end > 1.0:
            raise ValueError(f"curriculum_end must lie in (0, 1], got {self.curriculum_end}")
        if self.stop_plateau is not None:
            check_real("stop_plateau", self.stop_plateau, minimum=0.0, strict=True)
        if self.init_from is not None and not isinstance(self.init_from, str):
            raise TypeError(f"init_from must be a folder path (str), got {self.init_from!r}")
        check_choice("discrete", self.discrete, DISCRETE)
        check_choice("discrete_method", self.discrete_method, ODE_METHODS)
        check_choice("jvp", self.jvp, JVP_METHODS)
        check_choice("teacher", self.teacher, TEACHERS)
        check_choice("init", self.init, INITS)
        check_choice("times", self.times, TIMES)
        check_real("time_mean", self.time_mean)
        check_real("time_std", self.time_std, minimum=0.0, strict=True)
        check_int64("seed", self.seed)
        if self.init == "teacher" and self.teacher != "net":
            raise ValueError("init='teacher' needs teacher='net' (a network to copy)")
        for name in ("fd_step", "tangent_norm"):
            if getattr(self, name) is not None:
                check_real(name, getattr(self, name), minimum=0.0, strict=True)
        for name in ("gate_delta", "gate_rho", "time_max_freq"):
            check_real(name, getattr(self, name), minimum=0.0, strict=True)
        for name in ("guard_margin", "deriv_weight"):
            check_real(name, getattr(self, name), minimum=0.0)
        activation(self.act)
        for name in _POSITIVE_INTS:
            check_positive_int(name, getattr(self, name))
        if self.resume and self.out_dir is None:
            raise ValueError("resume needs out_dir (the run folder holding the checkpoint)")
        for name in (
            "warmup_steps",
            "blend_steps",
            "align_start",
            "critic_lead",
            "point_features",
            "save_every",
        ):
            check_positive_int(name, getattr(self, name), minimum=0)
        check_positive_int("eval_samples", self.eval_samples, minimum=2)
        for name in ("align_steps", "eval_steps"):
            ks = tuple(getattr(self, name))
            if not ks:
                raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {ks}")
            for k in ks:
                check_positive_int(name, k)
            setattr(self, name, ks)
        for name in ("lr", "lr_final", "critic_lr", "point_scale"):
            check_real(name, getattr(self, name), minimum=0.0, strict=True)
        for name in ("align_weight", "discrete_p", "adaptive_p"):
            check_real(name, getattr(self, name), minimum=0.0)
        if self.grad_clip is not None:
            check_real("grad_clip", self.grad_clip, minimum=0.0, strict=True)
        if self.align_batch is not None:
            check_positive_int("align_batch", self.align_batch, minimum=2)
        if not check_real("equal_fraction", self.equal_fraction, minimum=0.0) < 1.0:
            raise ValueError(f"equal_fraction must lie in [0, 1), got {self.equal_fraction}")
        if not check_real("grid_fraction", self.grid_fraction, minimum=0.0) <= 1.0:
            raise ValueError(f"grid_fraction must lie in [0, 1], got {self.grid_fraction}")
        if self.stop_plateau is not None and self.plateau_window % self.probe_every:
            raise ValueError(
                f"plateau_window ({self.plateau_window}) must be a multiple of probe_every "
                f"({self.probe_every}): the plateau compares two probes"
            )
        return self


_POSITIVE_INTS = (
    "steps",
    "batch",
    "hidden",
    "depth",
    "discrete_steps",
    "critic_updates",
    "critic_hidden",
    "critic_ode_steps",
    "teacher_steps",
    "gate_patience",
    "guard_patience",
    "signal_every",
    "teacher_fit_steps",
    "probe_every",
    "curriculum_stages",
    "plateau_window",
)


# --------------------------------------------------------------------------- building blocks


def _discrete_target(cfg: ToyConfig) -> Any:
    ramp = max(cfg.warmup_steps, 1)
    if cfg.curriculum == "alpha":
        return SplitCurriculumTarget(LinearSpan(1.0, cfg.curriculum_end, ramp))
    if cfg.curriculum == "dmf":
        return SplitCurriculumTarget(HalvingSpan(1.0, cfg.curriculum_stages, ramp), relative=False)
    if cfg.discrete == "split":
        return SplitTarget("first", teacher_steps=cfg.discrete_steps, method=cfg.discrete_method)
    return TeacherODETarget(steps=cfg.discrete_steps, method=cfg.discrete_method)


def _differential_target(cfg: ToyConfig) -> DifferentialTarget:
    return DifferentialTarget(cfg.jvp, fd_step=cfg.fd_step, tangent_norm=cfg.tangent_norm)


def _target(cfg: ToyConfig) -> Any:
    if cfg.target == "discrete":
        return _discrete_target(cfg)
    if cfg.target == "differential":
        return _differential_target(cfg)
    gate = None
    if cfg.switch == "gated":
        gate = SwitchGate(cfg.gate_delta, cfg.gate_rho, cfg.gate_patience)
    guard = SwitchGuard(cfg.guard_margin, cfg.guard_patience) if cfg.guard else None
    return WarmupTarget(
        _discrete_target(cfg),
        _differential_target(cfg),
        switch_step=cfg.warmup_steps,
        blend_steps=cfg.blend_steps,
        handover=cfg.handover,
        gate=gate,
        guard=guard,
        every=cfg.signal_every,
    )


def _mean_flow_loss(cfg: ToyConfig) -> MeanFlowLoss:
    target = _target(cfg)
    if cfg.times == "uniform":
        times = UniformTime()
    else:
        times = LogitNormalTime(cfg.time_mean, cfg.time_std)
    base = TimePairSampler(times, equal_fraction=cfg.equal_fraction)
    if cfg.grid_fraction > 0:
        grids = tuple(uniform_grid(k, dtype=torch.float64) for k in cfg.eval_steps)
        pairs = GridPairSampler(base, grids, cfg.grid_fraction)
    else:
        pairs = base
    weighting = _PhaseWeight(
        target, AdaptiveWeight(p=cfg.discrete_p), AdaptiveWeight(p=cfg.adaptive_p)
    )
    return MeanFlowLoss(pairs, target, weighting)


class _PhaseWeight:
    """MeanFlow's adaptive weight with its own power on the discrete and differential targets."""

    def __init__(
        self, target: Target, discrete: AdaptiveWeight, differential: AdaptiveWeight
    ) -> None:
        self.target, self.discrete, self.differential = target, discrete, differential

    def __call__(self, sq_err: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        weight = self.discrete if self.target.phase == "discrete" else self.differential
        return weight(sq_err, r, t)


def _critic(cfg: ToyConfig, dim: int) -> Any:
    if cfg.align == "kernel":
        return KernelCritic("mmd")
    fake = VelocityMLP(dim, hidden=cfg.critic_hidden, depth=3)
    if cfg.align == "meanflow":
        return MeanFlowCritic(fake, lr=cfg.critic_lr, ode_steps=cfg.critic_ode_steps)
    return FakeVelocityCritic(fake, lr=cfg.critic_lr)


def _alignments(cfg: ToyConfig, dim: int) -> list[AlignmentLoss]:
    if cfg.align == "none" or cfg.align_weight == 0:
        return []
    return [
        AlignmentLoss(
            _critic(cfg, dim), steps=k, critic_updates=cfg.critic_updates, teacher_steps=16
        )
        for k in cfg.align_steps
    ]


def _lr_at(cfg: ToyConfig, step: int) -> float:
    """Cosine decay from ``lr`` to ``lr_final`` over the run."""
    frac = step / max(cfg.steps - 1, 1)
    return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1.0 + math.cos(math.pi * frac))


class _History:
    """Per-step scalars, kept every ``every`` steps (for the loss figure), and at every step
    that measured the agreement signals, the gate or the guard (their own cadence)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.rows: list[dict[str, float]] = []

    def add(self, step: int, values: dict[str, float]) -> None:
        if step % self.every == 0 or any(k.startswith(_LOGGED) for k in values):
            self.rows.append({"step": step, **values})


def _progress(cfg: ToyConfig, done: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    name = cfg.name or cfg.preset
    return tqdm(total=cfg.steps, initial=done, desc=name, leave=False, mininterval=0.5)


# --------------------------------------------------------------------------- training


class _CountingField:
    """A velocity field that counts the points it is evaluated at (teacher NFE x batch)."""

    def __init__(self, field: Any) -> None:
        self.field, self.points = field, 0

    def __call__(self, z: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        self.points += z.shape[0]
        return self.field(z, t, **cond)


_LOGGED = ("agree_", "guard_", "gate_")


def _derivative_step(cfg, student, teacher, mf_loss, gen) -> torch.Tensor:
    """The derivative-supervision loss on a fresh batch of ``r < t`` pairs."""
    x = teacher.sample(cfg.batch, generator=gen)
    r, t = mf_loss.time_sampler(cfg.batch, dtype=torch.float32, generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    z = (1 - t)[:, None] * x + t[:, None] * noise
    with torch.no_grad():
        v = teacher(z, t)
    target = mf_loss.target.discrete_target if hasattr(mf_loss.target, "discrete_target") else None
    discrete = target if target is not None else _discrete_target(cfg)
    u_disc = discrete.compute(student, FlowPoint(z, r, t, v), teacher=teacher, generator=gen)
    return derivative_loss(student, z, r, t, v, u_disc)


def _train_step(cfg, step, student, teacher, opt, mf_loss, aligns, gen, rollback):
    x = teacher.sample(cfg.batch, generator=gen)
    loss, metrics = mf_loss(student, x, teacher=teacher, step=step, generator=gen)
    values = {"mf_loss": float(loss.detach()), "phase": float(metrics.get("warmup_phase", -1.0))}
    values |= {k: float(v) for k, v in metrics.items() if k.startswith(_LOGGED)}
    if cfg.deriv_weight > 0 and mf_loss.target.phase == "discrete":
        d_loss = _derivative_step(cfg, student, teacher, mf_loss, gen)
        loss = loss + cfg.deriv_weight * d_loss
        values["deriv_loss"] = float(d_loss.detach())
    if aligns and step >= cfg.align_start:
        aligned = step >= cfg.align_start + cfg.critic_lead
        for align in aligns:
            noise = torch.randn(cfg.align_batch or cfg.batch, x.shape[1], generator=gen)
            # one run of the student serves the critic's update and the student's loss
            traj = align.trajectory(student, noise, grad=aligned)
            critic_loss, _ = align.critic_step(student, noise, generator=gen, trajectory=traj)
            values[f"critic_{align.steps}"] = float(critic_loss)
            if aligned:
                a_loss, a_metrics = align.student_loss(
                    student, noise, teacher=teacher, generator=gen, trajectory=traj
                )
                loss = loss + cfg.align_weight * a_loss / len(aligns)
                g_rms = a_metrics.get("align_g_rms", a_loss.detach())
                values[f"align_{align.steps}"] = float(g_rms)
    if rollback is not None and rollback.observe(metrics):
        values["rolled_back"] = 1.0
        return values
    for group in opt.param_groups:
        group["lr"] = _lr_at(cfg, step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
    opt.step()
    return values


def _quick_eval(cfg, student, teacher_gmm, probe, gen_seed) -> dict[str, Any]:
    """1-step W2 (on the evaluation protocol's noise and data) and the probe errors."""
    gen = torch.Generator().manual_seed(gen_seed)
    n = cfg.eval_samples
    data = teacher_gmm.sample(n, generator=gen)
    teacher_gmm.sample(n, generator=gen)  # the data floor's draw: same noise as _evaluate
    noise = torch.randn(n, teacher_gmm.dim, generator=gen)
    try:
        x = sample_meanflow(student, noise, 1)
        w2_1 = _finite_metrics(x, teacher_gmm, data)["w2"]
    except FloatingPointError:
        w2_1 = None
    return {"w2_1": w2_1, "probe": _safe_probe(probe, student)}


def _safe_probe(probe, student) -> dict[str, float] | None:
    errors = probe(student)
    return errors if all(math.isfinite(v) for v in errors.values()) else None


class _Job:
    """What a checkpoint holds besides the config and the student: the optimiser, the losses'
    states (warm-up switch, critics), the rollback, the random generators, the logs and the
    step to run next."""

    def __init__(self, cfg: ToyConfig, dim: int, student: torch.nn.Module) -> None:
        self.mf_loss = _mean_flow_loss(cfg)
        self.aligns = _alignments(cfg, dim)
        self.opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
        self.rollback = SwitchRollback(self.opt) if cfg.rollback else None
        self.history = _History(every=max(1, cfg.steps // 500))
        self.probes: list[dict[str, Any]] = []
        self.at_switch: dict[str, Any] | None = None
        self.step, self.wall = 0, 0.0

    def state_dict(self, cfg: ToyConfig, student, teacher, gen, wall: float) -> dict:
        return {
            "config": dataclasses.asdict(cfg),
            "step": self.step,
            "wall_s": wall,
            "student": student.state_dict(),
            "optimizer": self.opt.state_dict(),
            "loss": self.mf_loss.state_dict(),
            "alignments": [align.state_dict() for align in self.aligns],
            "rollback": None if self.rollback is None else self.rollback.state_dict(),
            "rng": {"generator": gen.get_state(), "torch": torch.get_rng_state()},
            "teacher_points": teacher.points,
            "history": self.history.rows,
            "probes": self.probes,
            "at_switch": self.at_switch,
        }

    def branch(self, state: dict, student, teacher) -> None:
        """Start from another run's checkpoint: its student, optimiser, step, teacher
        evaluations and curves (not its targets' state or random draws)."""
        student.load_state_dict(state["student"])
        self.opt.load_state_dict(state["optimizer"])
        teacher.points = state["teacher_points"]
        self.history.rows = list(state["history"])
        # a run stopped at a plateau probed its last step, which this one probes again
        self.probes = [p for p in state["probes"] if p["step"] < state["step"]]
        self.step, self.wall = state["step"], state["wall_s"]

    def load_state_dict(self, state: dict, student, teacher, gen: torch.Generator) -> None:
        student.load_state_dict(state["student"])
        self.opt.load_state_dict(state["optimizer"])
        self.mf_loss.load_state_dict(state["loss"])
        for align, saved in zip(self.aligns, state["alignments"], strict=True):
            align.load_state_dict(saved)
        if self.rollback is not None:
            self.rollback.load_state_dict(state["rollback"])
        gen.set_state(state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        teacher.points = state["teacher_points"]
        self.history.rows, self.probes = state["history"], state["probes"]
        self.at_switch, self.step, self.wall = state["at_switch"], state["step"], state["wall_s"]


#: Settings a run may change when it resumes (they do not touch the training).
_RESUMABLE = ("progress", "figures", "save_every", "resume")
#: What a checkpoint written before a setting existed ran with.
_LEGACY = {"times": "uniform", "time_mean": -0.4, "time_std": 1.0, "handover": "blend"}
_LEGACY |= {"curriculum": "none", "curriculum_end": 0.05, "curriculum_stages": 5}
_LEGACY |= {"init_from": None, "stop_plateau": None, "plateau_window": 1000}
#: What a branch shares with the run it starts from (:attr:`ToyConfig.init_from`).
_BRANCH_SAME = ("preset", "seed", "teacher", "init", "hidden", "depth", "act", "time_max_freq")
_BRANCH_SAME += ("point_features", "point_scale", "teacher_fit_steps", "batch")


def _run_dir(cfg: ToyConfig) -> Path | None:
    return None if cfg.out_dir is None else Path(cfg.out_dir) / (cfg.name or cfg.preset)


def read_checkpoint(cfg: ToyConfig) -> dict[str, Any]:
    """The checkpoint a ``resume`` run continues from.

    A save interrupted by a kill leaves ``checkpoint/`` or ``checkpoint.old/`` whole
    (:func:`mfcore.adapters._durable.replace_folder`): the newer that reads back is taken, a
    corrupt one skipped with a warning naming it.

    Raises:
        FileNotFoundError: when the run folder has no checkpoint.
        ValueError: when none reads back whole (a corrupt file, a missing entry, non-finite
            weights, each named) or it was written with other settings.
    """
    from mfcore.adapters._durable import whole_folders  # safetensors: a toys dependency

    run_dir = _run_dir(cfg)
    folders = [] if run_dir is None else whole_folders(run_dir / "checkpoint")
    if not folders:
        raise FileNotFoundError(f"resume: no checkpoint in {run_dir}/checkpoint")
    reasons = []
    for folder in folders:
        try:
            state = _read_state(Path(folder))
        except (ValueError, FileNotFoundError) as err:
            reasons.append(str(err))
            logger.warning("resume: skipping %s (%s)", folder, err)
            continue
        now, saved = dataclasses.asdict(cfg), {**_LEGACY, **state["config"]}
        changed = [k for k in now if k not in _RESUMABLE and saved.get(k) != now[k]]
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
            raise ValueError(f"resume: {folder} has other settings ({diffs})")
        return state
    raise ValueError(f"resume: no checkpoint of {run_dir} reads back whole: {'; '.join(reasons)}")


_ENTRIES = ("config", "step", "wall_s", "student", "optimizer", "loss", "alignments")
_ENTRIES += ("rollback", "rng", "teacher_points", "history", "probes", "at_switch")


def branch_point(cfg: ToyConfig) -> dict[str, Any]:
    """The checkpoint of ``cfg.init_from`` a branch starts from, checked against ``cfg``.

    Raises:
        FileNotFoundError: when the folder has no checkpoint.
        ValueError: when it reads back corrupt, was another mixture, seed or network, or
            stopped beyond ``cfg.steps``.
    """
    from mfcore.adapters._durable import whole_folders

    folders = whole_folders(Path(str(cfg.init_from)) / "checkpoint")
    if not folders:
        raise FileNotFoundError(f"init_from: no checkpoint in {cfg.init_from}/checkpoint")
    state = _read_state(Path(folders[0]))
    saved, now = {**_LEGACY, **state["config"]}, dataclasses.asdict(cfg)
    other = [k for k in _BRANCH_SAME if saved.get(k) != now[k]]
    if other:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in other)
        raise ValueError(f"init_from: {cfg.init_from} is another run ({diffs})")
    if state["step"] > cfg.steps:
        raise ValueError(f"init_from: {cfg.init_from} stopped at step {state['step']} > steps")
    return state


def _read_state(folder: Path) -> dict[str, Any]:
    """A checkpoint folder's state, every entry present and the student's weights finite."""
    from mfcore.adapters._state import check_entries, load_state

    state = load_state(folder / "state")
    check_entries(state, _ENTRIES, folder)
    bad = _non_finite(state["student"])
    if bad:
        raise ValueError(f"{folder}: the student's weights are non-finite in {bad[:3]}")
    return state


def _non_finite(weights: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors of ``weights`` holding a NaN or an infinity."""
    return [k for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all()]


def _save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write ``<run_dir>/checkpoint/``: whole, synced, then swapped in (a kill leaves the old
    one or the new); a student with non-finite weights is not saved over it."""
    from mfcore.adapters._durable import replace_folder
    from mfcore.adapters._state import save_state

    bad = _non_finite(state["student"])
    if bad:
        logger.warning("not checkpointing step %d: non-finite weights in %s", state["step"], bad)
        return
    final, tmp = run_dir / "checkpoint", run_dir / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_state(state, tmp / "state")
    replace_folder(tmp, final)


def _plateaued(cfg: ToyConfig, probes: list[dict[str, Any]]) -> bool:
    """Whether the pooled probe error fell by less than ``cfg.stop_plateau`` (a fraction)
    over the last ``cfg.plateau_window`` steps, from twice that step on."""
    window = cfg.plateau_window
    if cfg.stop_plateau is None or probes[-1]["step"] < 2 * window:
        return False
    now = probes[-1]
    before = next((p for p in probes if p["step"] == now["step"] - window), None)
    if before is None:
        return False
    return before["pooled"] - now["pooled"] < cfg.stop_plateau * before["pooled"]


def _train(cfg, gmm, student, teacher, gen, probe, job: _Job) -> dict[str, Any]:
    bar = _progress(cfg, job.step)
    run_dir = _run_dir(cfg)
    collapse, start, converged = None, time.perf_counter(), None
    eval_seed = cfg.seed + 10_000

    def save() -> None:
        wall = job.wall + time.perf_counter() - start
        _save_checkpoint(run_dir, job.state_dict(cfg, student, teacher, gen, wall))

    def saved(step: int) -> bool:
        return bool(cfg.save_every) and step % cfg.save_every == 0

    try:
        for step in range(job.step, cfg.steps):
            if step == cfg.warmup_steps:
                job.at_switch = {"step": step, **_quick_eval(cfg, student, gmm, probe, eval_seed)}
            if step % cfg.probe_every == 0:
                job.probes.append(
                    {"step": step, "teacher_points": teacher.points, **probe(student)}
                )
                if _plateaued(cfg, job.probes):
                    converged = step
                    break
            values = _train_step(
                cfg, step, student, teacher, job.opt, job.mf_loss, job.aligns, gen, job.rollback
            )
            job.history.add(step, values)
            job.step = step + 1
            if run_dir is not None and saved(job.step):
                save()
            if bar is not None:
                bar.update(1)
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{values['mf_loss']:.3g}")
    except FloatingPointError as err:  # a non-finite loss: the run collapsed
        collapse = f"step {job.step}: {err}"
        logger.warning("training collapsed at %s", collapse)
    finally:
        if bar is not None:
            bar.close()
    if run_dir is not None and collapse is None and not saved(job.step):
        save()  # the end of the run
    job.wall += time.perf_counter() - start
    target = job.mf_loss.target
    events = getattr(target, "events", [])
    signals = getattr(target, "signals", None)
    done = max(job.step, 1)
    return {
        "collapsed": collapse is not None,
        "collapse": collapse,
        "steps_done": job.step,
        "converged_at": converged,
        "switch_step": getattr(target, "switched_at", None)
        or next((s for s, k in events if k == "switch"), None),
        "events": [[s, k] for s, k in events],
        "last_signals": None if signals is None else signals.metrics(),
        "align_start": cfg.align_start + cfg.critic_lead if job.aligns else None,
        "wall_s": job.wall,
        "ms_per_step": 1e3 * job.wall / done,
        "teacher_points": teacher.points,
        "teacher_nfe_per_sample": teacher.points / (cfg.batch * done),
        "at_switch": job.at_switch,
        "probes": job.probes,
        "history": job.history.rows,
    }


# --------------------------------------------------------------------------- evaluation


def _finite_metrics(samples: torch.Tensor, teacher: GaussianMixture, data: torch.Tensor) -> dict:
    if not bool(torch.isfinite(samples).all()):
        return dict.fromkeys(METRIC_KEYS)
    return evaluate(samples, teacher, data)


def _evaluate(cfg: ToyConfig, teacher: GaussianMixture, student, gen) -> dict[str, Any]:
    n, dim = cfg.eval_samples, teacher.dim
    data = teacher.sample(n, generator=gen)
    floor = teacher.sample(n, generator=gen)
    noise = torch.randn(n, dim, generator=gen)
    teacher_x, teacher_traj = sample_teacher(
        teacher, noise, cfg.teacher_steps, method="heun", return_trajectory=True
    )
    out: dict[str, Any] = {
        "teacher": {
            "method": "heun",
            "steps": cfg.teacher_steps,
            "nfe": 2 * cfg.teacher_steps,
            **evaluate(teacher_x, teacher, data),
        },
        "data_floor": evaluate(floor, teacher, data),
        "student": {},
    }
    samples: dict[str, Any] = {"data": data, "teacher": teacher_x, "teacher_traj": teacher_traj}
    for k in cfg.eval_steps:
        try:
            x, traj = sample_meanflow(student, noise, k, return_trajectory=True)
        except FloatingPointError:
            out["student"][str(k)] = {"nfe": k, **dict.fromkeys(METRIC_KEYS)}
            continue
        out["student"][str(k)] = {"nfe": k, **_finite_metrics(x, teacher, data)}
        samples[str(k)] = x
        samples[f"traj_{k}"] = traj
    return out | {"_samples": samples}


# --------------------------------------------------------------------------- entry points


def _as_config(config: ToyConfig | dict | None) -> ToyConfig:
    if config is None:
        return ToyConfig().validate()
    if isinstance(config, ToyConfig):
        return dataclasses.replace(config).validate()
    if isinstance(config, dict):
        fields = {f.name for f in dataclasses.fields(ToyConfig)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid: {sorted(fields)}")
        return ToyConfig(**config).validate()
    raise TypeError(f"config must be a ToyConfig, a dict or None, got {type(config).__name__}")


def run(
    config: ToyConfig | dict | None = None,
    teacher: GaussianMixture | None = None,
    *,
    teacher_net: VelocityMLP | None = None,
) -> dict[str, Any]:
    """Distil ``teacher`` (default: the config's preset) into a MeanFlow MLP and evaluate it.

    Args:
        config: a :class:`ToyConfig`, a dict of its fields, or ``None`` for the default.
        teacher: any 2-D or higher :class:`GaussianMixture` (figures only for 2-D).
        teacher_net: with ``config.teacher == "net"``, an already fitted teacher network
            for this mixture (e.g. shared by several runs); default: fit one
            (:func:`~mfcore.toys.teacher_net.fit_teacher_net`).

    Returns:
        the content of ``metrics.json``: ``config``, ``teacher``, ``data_floor``,
        ``student`` (keyed ``"1"``, ``"2"``, ``"4"``: ``nfe``, ``w2``, ``mmd``, ``nll``,
        ``mode_precision``, ``mode_recall``; ``None`` values after a collapse), ``probe``
        (the final relative error against the exact average velocity, pooled and per gap
        bin), ``teacher_net`` (its config and quality, or ``None`` with the exact teacher)
        and ``training``; plus ``run_dir`` (``None`` when nothing is written).
    """
    cfg = _as_config(config)
    if teacher is None:
        teacher = preset(cfg.preset)
    elif not isinstance(teacher, GaussianMixture):
        raise TypeError(f"teacher must be a GaussianMixture, got {type(teacher).__name__}")
    net_report = None
    if cfg.teacher == "net":
        if teacher_net is None:
            teacher_net = fit_teacher_net(teacher, teacher_net_config(cfg))
        elif not isinstance(teacher_net, VelocityMLP):
            raise TypeError(f"teacher_net must be a VelocityMLP, got {type(teacher_net).__name__}")
        net_report = {
            "config": dataclasses.asdict(teacher_net_config(cfg)),
            **teacher_net_report(teacher_net, teacher),
        }
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    student = _student(cfg, teacher, teacher_net)
    probe = AverageVelocityProbe(teacher, seed=cfg.seed)
    field = _CountingField(teacher_net if cfg.teacher == "net" else teacher)
    field.sample = teacher.sample  # type: ignore[attr-defined]  (data comes from the mixture)
    job = _Job(cfg, teacher.dim, student)
    if cfg.resume:
        job.load_state_dict(read_checkpoint(cfg), student, field, gen)
    elif cfg.init_from is not None:
        job.branch(branch_point(cfg), student, field)
    training = _train(cfg, teacher, student, field, gen, probe, job)
    results = _evaluate(cfg, teacher, student, torch.Generator().manual_seed(cfg.seed + 10_000))
    samples = results.pop("_samples")
    results["probe"] = _safe_probe(probe, student)
    results = {
        "config": dataclasses.asdict(cfg),
        **results,
        "teacher_net": net_report,
        "training": training,
    }
    results["run_dir"] = _write(cfg, results, samples, teacher, student)
    return results


def teacher_net_config(cfg: ToyConfig) -> TeacherNetConfig:
    """The teacher network a config asks for (its architecture is the student's)."""
    return TeacherNetConfig(
        hidden=cfg.hidden,
        depth=cfg.depth,
        act=cfg.act,
        max_freq=cfg.time_max_freq,
        steps=cfg.teacher_fit_steps,
    )


def _student(cfg: ToyConfig, gmm: GaussianMixture, teacher_net: VelocityMLP | None):
    if cfg.init == "teacher":
        assert teacher_net is not None
        return IntervalStudent(teacher_net).train().requires_grad_(True)
    return MeanFlowMLP(
        gmm.dim,
        hidden=cfg.hidden,
        depth=cfg.depth,
        act=cfg.act,
        point_features=cfg.point_features,
        point_scale=cfg.point_scale,
        max_freq=cfg.time_max_freq,
    )


def _write(
    cfg: ToyConfig, results: dict, samples: dict, teacher: GaussianMixture, student
) -> str | None:
    run_dir = _run_dir(cfg)
    if run_dir is None:
        return None
    from safetensors.torch import save_file

    from mfcore.adapters._durable import write_atomic, write_json

    run_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in student.state_dict().items()}
    bad = _non_finite(weights)
    if bad:  # a collapsed run: its metrics say so, and an earlier student file stays
        logger.warning("not writing student.safetensors: non-finite weights in %s", bad[:3])
    else:
        write_atomic(run_dir / "student.safetensors", lambda tmp: save_file(weights, tmp))
    # (allow_nan: a collapsed run's loss history may hold infinities, as before)
    write_json(
        run_dir / "metrics.json", results | {"run_dir": str(run_dir)}, indent=1, allow_nan=True
    )
    if cfg.figures and teacher.dim == 2:
        from . import plots

        plots.write_run_figures(run_dir, teacher, samples, results)
    return str(run_dir)


def summary_table(results: dict) -> str:
    """A plain-text table of the metrics: data floor, teacher and student rows."""
    head = f"{'':<14}{'NFE':>5}" + "".join(f"{k:>16}" for k in METRIC_KEYS)
    rows = [head, "-" * len(head)]

    def row(label: str, nfe: Any, m: dict) -> str:
        cells = "".join(
            f"{'n/a':>16}" if m.get(k) is None else f"{m[k]:>16.4f}" for k in METRIC_KEYS
        )
        return f"{label:<14}{nfe!s:>5}{cells}"

    rows.append(row("data floor", "-", results["data_floor"]))
    rows.append(row("teacher", results["teacher"]["nfe"], results["teacher"]))
    for k, m in results["student"].items():
        rows.append(row(f"student {k}-step", m["nfe"], m))
    tr = results["training"]
    rows.append(
        f"training: {tr['steps_done']} steps in {tr['wall_s']:.1f} s "
        f"({tr['ms_per_step']:.1f} ms/step), warm-up switch at {tr['switch_step']}, "
        f"collapsed: {tr['collapsed']}"
    )
    return "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    d = ToyConfig()
    p = argparse.ArgumentParser(
        prog="mfcore-toy",
        description="Distil an exact Gaussian-mixture teacher into a few-step MeanFlow student.",
    )
    p.add_argument("--preset", default=d.preset, choices=sorted(presets))
    p.add_argument("--name", default=None, help="run name (default: the preset)")
    p.add_argument("--out", default=d.out_dir, help="output folder (default: runs)")
    p.add_argument("--seed", type=cli_int, default=d.seed)
    p.add_argument("--steps", type=cli_int, default=d.steps, help="student optimiser steps")
    p.add_argument("--batch", type=cli_int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--target", default=d.target, choices=TARGETS)
    p.add_argument("--warmup-steps", type=cli_int, default=d.warmup_steps)
    p.add_argument("--align", default=d.align, choices=CRITICS)
    p.add_argument("--align-weight", type=float, default=d.align_weight)
    p.add_argument("--align-start", type=cli_int, default=d.align_start)
    p.add_argument("--eval-samples", type=cli_int, default=d.eval_samples)
    p.add_argument(
        "--save-every",
        type=cli_int,
        default=d.save_every,
        help="steps between checkpoints (0: only at the end)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in <out>/<name> from its checkpoint (same settings)",
    )
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--threads",
        type=cli_int,
        default=1,
        help="torch intra-op threads (default 1: the toy's tensors are too small to gain "
        "from more, and a busy machine makes each op wait for the slowest thread)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """The ``mfcore-toy`` command: run the toy distillation and print a summary table."""
    parser = _parser()
    args = parser.parse_args(argv)
    cfg = ToyConfig(
        preset=args.preset,
        name=args.name,
        out_dir=args.out,
        seed=args.seed,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        target=args.target,
        warmup_steps=args.warmup_steps,
        align=args.align,
        align_weight=args.align_weight,
        align_start=args.align_start,
        eval_samples=args.eval_samples,
        figures=not args.no_figures,
        progress=not args.quiet,
        save_every=args.save_every,
        resume=args.resume,
    )
    try:
        cfg.validate()
        torch.set_num_threads(check_positive_int("threads", args.threads))
        if cfg.resume:
            read_checkpoint(cfg)
    except (TypeError, ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    results = run(cfg)
    print(summary_table(results))
    if results["run_dir"] is not None:
        print(f"wrote {results['run_dir']}/metrics.json")


if __name__ == "__main__":
    main()
