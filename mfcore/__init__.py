"""mfcore: MeanFlow few-step distillation of flow-matching models.

Conventions (see docs/concepts.md): ``z_t = (1 - t) x + t eps`` with t = 0 data and t = 1
noise, ``v = eps - x``, and one student step ``z_r = z_t - (t - r) u(z_t, r, t)``; times
are ``(B,)`` tensors.

``import mfcore`` gives the main names; each lives in a module with one concept:

- :mod:`mfcore.fields`: the model contracts ``VelocityField`` and ``MeanVelocityField``, and
  the typed roles ``Target``, ``Critic`` and ``Weighting``;
- :mod:`mfcore.path`: the rectified-flow path and ``FlowPoint``, a point on it;
- :mod:`mfcore.time`: time samplers, shifts, ``(r, t)`` pairs and sampling grids;
- :mod:`mfcore.jvp`: the total derivative ``du/dt`` along ``(v, 0, 1)``;
- :mod:`mfcore.attention`: attention that forward-mode AD can differentiate;
- :mod:`mfcore.targets`: MeanFlow targets; :mod:`mfcore.warmup`: the warm-up switch;
  :mod:`mfcore.curricula`: a split target that moves from flow matching towards MeanFlow;
- :mod:`mfcore.losses`: ``MeanFlowLoss``, ``FlowMatchingLoss``, ``AdaptiveWeight``;
- :mod:`mfcore.critics`: trajectory distribution alignment (``AlignmentLoss``);
- :mod:`mfcore.guidance`: classifier-free guidance;
- :mod:`mfcore.solvers`: ODE solvers and few-step samplers;
- :mod:`mfcore.arcflow`: the ArcFlow momentum-mixture student.

``mfcore.toys`` (exact Gaussian-mixture teachers, metrics, the toy job) and
``mfcore.adapters`` (diffusers FLUX with LoRA) are optional subpackages.

Example:
    >>> import torch
    >>> import mfcore
    >>> loss_fn = mfcore.MeanFlowLoss(target=mfcore.TeacherODETarget(steps=4))
    >>> student = lambda z, r, t: -z  # any u(z, r, t) callable or nn.Module
    >>> loss, metrics = loss_fn(student, torch.randn(8, 2), teacher=lambda z, t: -z)
    >>> mfcore.sample_meanflow(student, torch.randn(8, 2), steps=1).shape
    torch.Size([8, 2])
"""

from mfcore.critics import AlignmentLoss, FakeVelocityCritic, KernelCritic, MeanFlowCritic
from mfcore.curricula import HalvingSpan, LinearSpan, SplitCurriculumTarget
from mfcore.fields import (
    Critic,
    DiscreteTarget,
    MeanVelocityField,
    SampleCritic,
    Target,
    TargetOutput,
    TrainedCritic,
    VelocityField,
    Weighting,
)
from mfcore.guidance import ClassifierFreeGuidance, MeanFlowGuidance, apg_velocity, cfg_velocity
from mfcore.jvp import total_derivative
from mfcore.losses import AdaptiveWeight, FlowMatchingLoss, MeanFlowLoss
from mfcore.path import FlowPoint, sample_path
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
    GridPairSampler,
    LogitNormalTime,
    ResolutionShiftedTime,
    ShiftedTime,
    TimePairSampler,
    UniformTime,
    shifted_grid,
    uniform_grid,
)
from mfcore.warmup import SwitchGate, SwitchGuard, SwitchRollback, WarmupTarget

__version__ = "0.1.0"
__all__ = [
    # contracts and roles
    "VelocityField",
    "MeanVelocityField",
    "Target",
    "DiscreteTarget",
    "TargetOutput",
    "Critic",
    "TrainedCritic",
    "SampleCritic",
    "Weighting",
    # the path
    "FlowPoint",
    "sample_path",
    # losses
    "MeanFlowLoss",
    "FlowMatchingLoss",
    "AdaptiveWeight",
    # targets and the warm-up switch
    "DifferentialTarget",
    "TeacherODETarget",
    "SplitTarget",
    "differential_target",
    "teacher_ode_target",
    "split_target",
    "WarmupTarget",
    "SwitchGate",
    "SwitchGuard",
    "SwitchRollback",
    "SplitCurriculumTarget",
    "LinearSpan",
    "HalvingSpan",
    "total_derivative",
    # time samplers and grids
    "UniformTime",
    "LogitNormalTime",
    "ShiftedTime",
    "ResolutionShiftedTime",
    "TimePairSampler",
    "ClampedPairSampler",
    "GridPairSampler",
    "uniform_grid",
    "shifted_grid",
    # critics
    "AlignmentLoss",
    "FakeVelocityCritic",
    "MeanFlowCritic",
    "KernelCritic",
    # guidance
    "MeanFlowGuidance",
    "ClassifierFreeGuidance",
    "cfg_velocity",
    "apg_velocity",
    # solvers and samplers
    "odeint",
    "sample_teacher",
    "sample_meanflow",
    "__version__",
]
