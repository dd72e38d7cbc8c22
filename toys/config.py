"""The settings of a toy run (:class:`ToyConfig`), checked once where they are built.

The defaults are the documented default run (docs/toys.md); :func:`as_config` turns what
:func:`mfcore.toys.train.run` is given (a config, a dict of its fields or ``None``) into a
checked :class:`ToyConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mfcore._checks import check_choice, check_int64, check_positive_int, check_real
from mfcore.jvp import JVP_METHODS
from mfcore.solvers import ODE_METHODS
from mfcore.warmup import HANDOVERS

from .gmm import presets
from .nets import activation

__all__ = ["ToyConfig", "as_config", "TARGETS", "CRITICS", "METRIC_KEYS"]

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


def as_config(config: ToyConfig | dict | None) -> ToyConfig:
    """A checked copy of ``config`` (a :class:`ToyConfig`, a dict of its fields, or ``None``
    for the default)."""
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
