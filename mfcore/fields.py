"""The contracts every piece of mfcore composes on: the models, and the roles that plug in.

Models. A teacher is a :class:`VelocityField` ``v(z, t, **cond)``; a student is a
:class:`MeanVelocityField` ``u(z, r, t, **cond)``. Both return a tensor shaped like ``z``;
times are ``(B,)`` tensors with t = 0 data and t = 1 noise. Adapters turn diffusers models
into these; any plain callable with the same signature works.

Roles. The objects a loss is built from are typed by what they do, not by flags:

- a :class:`Target` turns a state, an interval and a velocity into the student's prediction
  and a detached regression target (:class:`~mfcore.losses.MeanFlowLoss`'s ``target``); a
  :class:`DiscreteTarget` also gives the target alone, without a derivative of the student;
- a :class:`Critic` gives the student's alignment loss on its own few-step samples
  (:class:`~mfcore.critics.AlignmentLoss`'s ``critic``); a :class:`TrainedCritic` has a
  network it trains on them, a :class:`SampleCritic` compares with teacher samples;
- a :class:`Weighting` maps per-sample squared errors and their intervals to per-sample
  weights, with one signature everywhere (the losses, the critics and ArcFlow).

The composed objects (the losses, ``AlignmentLoss``) validate their inputs once, at their
entry; the roles they call receive checked arguments and do not check them again (a role's
own construction arguments are checked when it is built).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from mfcore.path import FlowPoint

__all__ = [
    "VelocityField",
    "MeanVelocityField",
    "velocity_of",
    "TargetOutput",
    "Target",
    "DiscreteTarget",
    "Critic",
    "TrainedCritic",
    "SampleCritic",
    "Weighting",
]


# --------------------------------------------------------------------------- models


@runtime_checkable
class VelocityField(Protocol):
    """Instantaneous velocity ``v(z, t) = E[eps - x | z_t = z]``.

    Args:
        z: state ``(B, ...)`` at time ``t``.
        t: times ``(B,)`` in ``[0, 1]``.
        **cond: conditioning passed through unchanged.

    Returns:
        velocity ``(B, ...)``, same shape as ``z``.
    """

    def __call__(self, z: Tensor, t: Tensor, **cond: Any) -> Tensor: ...


@runtime_checkable
class MeanVelocityField(Protocol):
    """Average velocity ``u(z_t, r, t) = (z_t - z_r) / (t - r)`` over ``[r, t]``.

    MeanFlow, Geng et al., arXiv 2505.13447, eq. 3.

    Args:
        z: state ``(B, ...)`` at time ``t``.
        r: end times ``(B,)``, ``r <= t``.
        t: start times ``(B,)``.
        **cond: conditioning passed through unchanged.

    Returns:
        average velocity ``(B, ...)``; one step is ``z_r = z_t - (t - r) u``.
    """

    def __call__(self, z: Tensor, r: Tensor, t: Tensor, **cond: Any) -> Tensor: ...


def velocity_of(u_fn: MeanVelocityField) -> VelocityField:
    """The instantaneous velocity of a mean-velocity field: ``v(z, t) = u(z, t, t)``.

    Example:
        >>> import torch
        >>> u = lambda z, r, t: z * (t - r + 1.0)[:, None]
        >>> v = velocity_of(u)
        >>> v(torch.ones(2, 3), torch.rand(2)).sum().item()
        6.0
    """

    def v_fn(z: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return u_fn(z, t, t, **cond)

    return v_fn


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class TargetOutput:
    """What a :class:`Target` returns.

    Attributes:
        pred: the student's ``u(z_t, r, t)``, ``(B, ...)``, attached to the graph.
        target: the regression target ``u_tgt``, ``(B, ...)``, detached.
        metrics: detached scalars for logging.
    """

    pred: Tensor
    target: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


@runtime_checkable
class Target(Protocol):
    """A MeanFlow target (:mod:`mfcore.targets`, :class:`mfcore.warmup.WarmupTarget`).

    Called by :class:`~mfcore.losses.MeanFlowLoss` as ``target(student, point, *, teacher,
    generator, step) -> TargetOutput`` with checked arguments: ``point`` a
    :class:`~mfcore.path.FlowPoint` (``z_t`` and ``v`` ``(B, ...)``, ``r <= t`` ``(B,)`` in
    ``[0, 1]``, ``cond`` a dict), ``step`` an int ``>= 0`` or ``None``.

    Attributes:
        phase: what the next call regresses on: ``"discrete"`` (a target that needs no
            derivative of the student, e.g. the teacher's ODE secant), ``"differential"``
            (MeanFlow's JVP target) or ``"blend"`` (a mix of both, during a warm-up's ramp).
    """

    @property
    def phase(self) -> str: ...

    def __call__(
        self,
        student: Callable[..., Tensor],
        point: FlowPoint,
        *,
        teacher: Callable[..., Tensor] | None = None,
        generator: torch.Generator | None = None,
        step: int | None = None,
    ) -> TargetOutput: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class DiscreteTarget(Target, Protocol):
    """A :class:`Target` whose ``phase`` is ``"discrete"``, which also gives the detached
    target alone (the warm-up switch blends it and keeps it for its guard).

    ``compute(student, point, *, teacher, generator) -> (B, ...)``.
    """

    def compute(
        self,
        student: Callable[..., Tensor],
        point: FlowPoint,
        *,
        teacher: Callable[..., Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor: ...


# --------------------------------------------------------------------------- critics


@runtime_checkable
class Critic(Protocol):
    """A trajectory-alignment critic (:mod:`mfcore.critics`).

    Called by :class:`~mfcore.critics.AlignmentLoss` at every segment end of the student's
    few-step trajectory, with checked arguments: ``alignment_loss(z_r, r, t, *, teacher,
    weighting, reference, cond, generator) -> (loss, metrics)`` with ``z_r`` ``(B, ...)``
    attached to the student's graph, the segment ``r < t`` ``(B,)``, ``weighting`` a
    :class:`Weighting` or ``None``, ``cond`` a dict.
    """

    def alignment_loss(
        self,
        z_r: Tensor,
        r: Tensor,
        t: Tensor,
        *,
        teacher: Callable[..., Tensor] | None,
        weighting: Weighting | None,
        reference: Tensor | None,
        cond: dict[str, Any],
        generator: torch.Generator | None,
    ) -> tuple[Tensor, dict[str, Tensor]]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class TrainedCritic(Critic, Protocol):
    """A :class:`Critic` with a network, trained by ``optimizer`` on ``critic_loss(z_r, r, t,
    *, cond, generator) -> (loss, metrics)`` at the student's detached segment ends (the
    second time scale of :meth:`~mfcore.critics.AlignmentLoss.critic_step`)."""

    optimizer: torch.optim.Optimizer

    def critic_loss(
        self,
        z_r: Tensor,
        r: Tensor,
        t: Tensor,
        *,
        cond: dict[str, Any],
        generator: torch.Generator | None,
    ) -> tuple[Tensor, dict[str, Tensor]]: ...


@runtime_checkable
class SampleCritic(Critic, Protocol):
    """A :class:`Critic` that compares the student's states with teacher samples at
    ``t = 0`` (its ``reference``) rather than with the teacher's velocity field;
    ``reference_samples(teacher, like, *, steps, cond, generator) -> (B, ...)`` draws them
    when the caller has none."""

    def reference_samples(
        self,
        teacher: Callable[..., Tensor],
        like: Tensor,
        *,
        steps: int,
        cond: dict[str, Any],
        generator: torch.Generator | None,
    ) -> Tensor: ...


# --------------------------------------------------------------------------- weightings


@runtime_checkable
class Weighting(Protocol):
    """Per-sample loss weights ``w(sq_err, r, t) -> (B,)``, one signature everywhere.

    Args:
        sq_err: the per-sample squared error ``(B,)`` the weight may depend on: the MeanFlow
            or flow-matching error (:mod:`mfcore.losses`), the squared norm of a critic's
            gap (:mod:`mfcore.critics`), the rollout's velocity error (:mod:`mfcore.arcflow`).
        r, t: ``(B,)`` ends of the interval the error belongs to, ``r <= t`` (``r = t`` in
            flow matching; ``[segment end, critic time]`` in a critic; the rollout's grid
            ends in ArcFlow).

    Returns:
        weights ``(B,)``, detached (MeanFlow's ``sg(.)``, arXiv 2505.13447, eq. 22);
        :class:`~mfcore.losses.AdaptiveWeight` is the standard one.
    """

    def __call__(self, sq_err: Tensor, r: Tensor, t: Tensor) -> Tensor: ...
