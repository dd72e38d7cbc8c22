"""What a :class:`~mfcore.toys.config.ToyConfig` builds: the targets, the MeanFlow loss with
its time pairs and weighting, the alignment critics, the student network and the teacher
network's settings.
"""

from __future__ import annotations

from typing import Any

import torch

from mfcore.critics import AlignmentLoss, FakeVelocityCritic, KernelCritic, MeanFlowCritic
from mfcore.curricula import HalvingSpan, LinearSpan, SplitCurriculumTarget
from mfcore.fields import Target
from mfcore.losses import AdaptiveWeight, MeanFlowLoss
from mfcore.targets import DifferentialTarget, SplitTarget, TeacherODETarget
from mfcore.time import GridPairSampler, LogitNormalTime, TimePairSampler, UniformTime, uniform_grid
from mfcore.warmup import SwitchGate, SwitchGuard, WarmupTarget

from .config import ToyConfig
from .gmm import GaussianMixture
from .nets import IntervalStudent, MeanFlowMLP, VelocityMLP
from .teacher_net import TeacherNetConfig

__all__ = [
    "discrete_target",
    "differential_target",
    "training_target",
    "mean_flow_loss",
    "PhaseWeight",
    "critic",
    "alignments",
    "student_net",
    "teacher_net_config",
]


def discrete_target(cfg: ToyConfig) -> Any:
    ramp = max(cfg.warmup_steps, 1)
    if cfg.curriculum == "alpha":
        return SplitCurriculumTarget(LinearSpan(1.0, cfg.curriculum_end, ramp))
    if cfg.curriculum == "dmf":
        return SplitCurriculumTarget(HalvingSpan(1.0, cfg.curriculum_stages, ramp), relative=False)
    if cfg.discrete == "split":
        return SplitTarget("first", teacher_steps=cfg.discrete_steps, method=cfg.discrete_method)
    return TeacherODETarget(steps=cfg.discrete_steps, method=cfg.discrete_method)


def differential_target(cfg: ToyConfig) -> DifferentialTarget:
    return DifferentialTarget(cfg.jvp, fd_step=cfg.fd_step, tangent_norm=cfg.tangent_norm)


def training_target(cfg: ToyConfig) -> Any:
    if cfg.target == "discrete":
        return discrete_target(cfg)
    if cfg.target == "differential":
        return differential_target(cfg)
    gate = None
    if cfg.switch == "gated":
        gate = SwitchGate(cfg.gate_delta, cfg.gate_rho, cfg.gate_patience)
    guard = SwitchGuard(cfg.guard_margin, cfg.guard_patience) if cfg.guard else None
    return WarmupTarget(
        discrete_target(cfg),
        differential_target(cfg),
        switch_step=cfg.warmup_steps,
        blend_steps=cfg.blend_steps,
        handover=cfg.handover,
        gate=gate,
        guard=guard,
        every=cfg.signal_every,
    )


def mean_flow_loss(cfg: ToyConfig) -> MeanFlowLoss:
    target = training_target(cfg)
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
    weighting = PhaseWeight(
        target, AdaptiveWeight(p=cfg.discrete_p), AdaptiveWeight(p=cfg.adaptive_p)
    )
    return MeanFlowLoss(pairs, target, weighting)


class PhaseWeight:
    """MeanFlow's adaptive weight with its own power on the discrete and differential targets."""

    def __init__(
        self, target: Target, discrete: AdaptiveWeight, differential: AdaptiveWeight
    ) -> None:
        self.target, self.discrete, self.differential = target, discrete, differential

    def __call__(self, sq_err: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        weight = self.discrete if self.target.phase == "discrete" else self.differential
        return weight(sq_err, r, t)


def critic(cfg: ToyConfig, dim: int) -> Any:
    if cfg.align == "kernel":
        return KernelCritic("mmd")
    fake = VelocityMLP(dim, hidden=cfg.critic_hidden, depth=3)
    if cfg.align == "meanflow":
        return MeanFlowCritic(fake, lr=cfg.critic_lr, ode_steps=cfg.critic_ode_steps)
    return FakeVelocityCritic(fake, lr=cfg.critic_lr)


def alignments(cfg: ToyConfig, dim: int) -> list[AlignmentLoss]:
    if cfg.align == "none" or cfg.align_weight == 0:
        return []
    return [
        AlignmentLoss(
            critic(cfg, dim), steps=k, critic_updates=cfg.critic_updates, teacher_steps=16
        )
        for k in cfg.align_steps
    ]


def student_net(cfg: ToyConfig, gmm: GaussianMixture, teacher_net: VelocityMLP | None):
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


def teacher_net_config(cfg: ToyConfig) -> TeacherNetConfig:
    """The teacher network a config asks for (its architecture is the student's)."""
    return TeacherNetConfig(
        hidden=cfg.hidden,
        depth=cfg.depth,
        act=cfg.act,
        max_freq=cfg.time_max_freq,
        steps=cfg.teacher_fit_steps,
    )
