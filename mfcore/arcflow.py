r"""ArcFlow: a momentum-mixture velocity within each student step, integrated in closed form.

ArcFlow (Yang et al., arXiv 2602.09014) observes that one straight step per interval cannot
follow a teacher trajectory whose tangent keeps turning. Instead, at the source time ``s0``
of a step the student network predicts ``K`` velocity components ``m_k``, mixture weights
``pi_k`` and non-negative rates ``g_k``, and the velocity inside the step evolves as a
mixture of momentum processes (time runs from 1 down to 0, so ``s <= s0``):

.. math::

    v(s) = \sum_k \pi_k\, m_k\, e^{g_k (s_0 - s)}.

Component 0 has rate 0 (a constant velocity), so ``K = 1`` is an Euler step. Because
``v(s)`` does not depend on the state, the step integrates exactly (:func:`arc_step`).

Conventions as everywhere in mfcore: t = 0 data, t = 1 noise, ``dz/ds = v`` and sampling
runs from ``s = 1`` down to ``s = 0``. Times are ``(B,)`` tensors. Shapes: ``z`` is
``(B, *Z)``; components ``m`` are ``(B, K, *Z)``; weights and rates are ``(B, K, *S)``
where ``S`` has the rank of ``Z`` and each of its sizes is 1 or the matching size of
``Z`` (an explicit, checked broadcast: :class:`ArcFlowHead` shares one weight and one
rate across the channels of a position, ``S = (1, H, W)`` for ``Z = (C, H, W)``).

Rate cap: rates must lie in ``[0, MAX_RATE]`` with ``MAX_RATE = 50``. Since every time gap
is at most 1, the largest factor is ``e^50 ~ 5e21``, finite even in float32 (whose
``exp`` overflows past 88); a rate beyond the cap would make the velocity grow by more than
``e^50`` across one step, which no teacher trajectory does. :class:`ArcFlowHead` caps its
rates smoothly at ``max_rate`` (default 10).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from mfcore._checks import (
    check_callable,
    check_cond,
    check_finite,
    check_fraction,
    check_grid,
    check_grid_steps,
    check_instance,
    check_positive_int,
    check_real,
    check_state,
    check_tensor,
    check_weighting,
    check_weights,
)
from mfcore.arc_mixture import (
    MAX_RATE,
    ArcFlowHead,
    ArcFlowStudent,
    ArcParams,
    arc_step,
    arc_velocity,
    arc_velocity_error,
    check_arc_params,
    split_arc_output,
)
from mfcore.fields import VelocityField, Weighting
from mfcore.path import compute_dtype, expand_time
from mfcore.time import uniform_grid

__all__ = [
    "MAX_RATE",
    "ArcParams",
    "ArcFlowStudent",
    "arc_velocity",
    "arc_step",
    "arc_velocity_error",
    "split_arc_output",
    "ArcFlowHead",
    "sample_arcflow",
    "TeacherMixSchedule",
    "ArcFlowDistillationLoss",
]


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def _resolve_grid(steps: int | None, grid: Tensor | None, ref: Tensor) -> Tensor:
    """The ``(N+1,)`` float64 grid: uniform with ``steps`` (2 when None), or ``grid``."""
    if grid is None:
        n = 2 if steps is None else check_positive_int("steps", steps)
        return uniform_grid(n, device=ref.device, dtype=torch.float64)
    grid = check_grid(grid, ref, full_span=False)
    check_grid_steps(steps, grid)
    return grid.double()


def _batch_time(value: Tensor, z: Tensor) -> Tensor:
    """A grid entry as a ``(B,)`` time in the compute dtype of ``z``."""
    return value.to(compute_dtype(z.dtype)).expand(z.shape[0]).clone()


def _call_student(student: ArcFlowStudent, z: Tensor, s0: Tensor, cond: dict) -> ArcParams:
    params = student(z, s0, **cond)
    check_arc_params(params, z)
    if not torch.equal(params.s0.to(s0.dtype), s0):
        raise ValueError("the student must return ArcParams whose s0 is the s0 it was given")
    return params


def sample_arcflow(
    student: ArcFlowStudent,
    noise: Tensor,
    steps: int | None = None,
    *,
    grid: Tensor | None = None,
    cond: dict | None = None,
    return_trajectory: bool = False,
    substeps: int = 1,
    enable_grad: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Few-step ArcFlow sampling: one network call and one closed-form step per interval.

    For each interval ``[s_{i+1}, s_i]`` of the grid the student predicts the mixture at
    ``s_i`` and :func:`arc_step` integrates it exactly (ArcFlow, arXiv 2602.09014).
    ``substeps`` only adds points to the returned trajectory (the closed form composes, so
    the end point does not change).

    Args:
        student: ``f(z, s0, **cond) -> ArcParams``.
        noise: initial state ``(B, *Z)`` at ``grid[0]`` (1 by default).
        steps: number of network calls ``N`` on a uniform grid (2 when None); with
            ``grid``, None or ``len(grid) - 1``.
        grid: strictly decreasing times ``(N+1,)`` in ``[0, 1]`` (they need not start at 1
            or end at 0); uniform from 1 to 0 by default.
        cond: conditioning passed to the student.
        return_trajectory: also return every (sub)step's state.
        substeps: closed-form sub-steps per interval, for the trajectory.
        enable_grad: keep the autograd graph (sampling runs under no_grad otherwise).

    Returns:
        the final state ``(B, *Z)`` in the dtype of ``noise``, or, when
        ``return_trajectory``, ``(final, trajectory)`` with ``trajectory``
        ``(N*substeps+1, B, *Z)`` from ``noise`` to the final state (as
        :func:`mfcore.solvers.sample_meanflow`).
    """
    check_tensor("noise", noise, ndim_min=1)
    cond = check_cond(cond)
    n_sub = check_positive_int("substeps", substeps)
    times = _resolve_grid(steps, grid, noise)
    with torch.set_grad_enabled(enable_grad):
        z, states = noise, [noise]
        for i in range(times.shape[0] - 1):
            params = _call_student(student, z, _batch_time(times[i], z), cond)
            z = _substeps(params, z, times[i], times[i + 1], n=n_sub, states=states)
    return (z, torch.stack(states)) if return_trajectory else z


def _substeps(
    params: ArcParams, z: Tensor, s_start: Tensor, s_end: Tensor, *, n: int, states: list
) -> Tensor:
    """Closed-form sub-steps from ``s_start`` to ``s_end``, appending each state."""
    fractions = torch.linspace(0.0, 1.0, n + 1, device=z.device, dtype=torch.float64)
    knots = s_start.double() + fractions * (s_end.double() - s_start.double())
    z_start = z
    for j in range(n):
        s_b = _batch_time(knots[j + 1], z)
        z = arc_step(params, z_start, params.s0, s_b, validate=False)
        states.append(z)
    check_finite("sample_arcflow state", z)
    return z


# ---------------------------------------------------------------------------------------------
# Trajectory distillation
# ---------------------------------------------------------------------------------------------


class _TeacherCalls(NamedTuple):
    """What one distillation call passes to every teacher evaluation of its rollout."""

    teacher: VelocityField
    cond: dict
    generator: torch.Generator | None


class TeacherMixSchedule:
    """Probability of replacing a student step by teacher Euler steps, decaying to zero.

    ``p(step) = start * max(0, 1 - step / decay_steps) ** power``: early in training the
    rollout follows the teacher more often (ArcFlow's mixed trajectories, arXiv 2602.09014),
    later only the student's own trajectory is used.

    Args:
        start: probability at step 0, in ``[0, 1]``.
        decay_steps: training steps until the probability reaches zero (``>= 1``).
        power: shape of the decay (1 linear, 2 quadratic), ``> 0``.
    """

    def __init__(self, start: float = 0.5, decay_steps: int = 1000, *, power: float = 1.0):
        self._set(start, decay_steps, power)

    def _set(self, start: object, decay_steps: object, power: object) -> None:
        self.start = check_fraction("start", start)
        self.power = check_real("power", power, minimum=0.0, strict=True)
        self.decay_steps = check_positive_int("decay_steps", decay_steps)

    def __call__(self, step: int) -> float:
        """The mixing probability at training step ``step >= 0``."""
        check_positive_int("step", step, minimum=0)
        return self.start * max(0.0, 1.0 - step / self.decay_steps) ** self.power

    def state_dict(self) -> dict[str, float | int]:
        """The schedule's configuration."""
        return {"start": self.start, "decay_steps": self.decay_steps, "power": self.power}

    def load_state_dict(self, state: dict) -> None:
        """Restore a configuration from :meth:`state_dict`."""
        check_state("TeacherMixSchedule", state, ("start", "decay_steps", "power"))
        self._set(state["start"], state["decay_steps"], state["power"])


def _from_error_weighting(old: Callable[[Tensor], Tensor]) -> Weighting:
    """A weighting of the former ArcFlow signature ``w(err)`` as ``w(err, r, t)``."""

    def weighting(sq_err: Tensor, r: Tensor, t: Tensor) -> Tensor:
        return old(sq_err)

    return weighting


class ArcFlowDistillationLoss:
    r"""ArcFlow trajectory distillation: match the mixture's velocity to the teacher's.

    One call rolls ``N`` steps from the noise down the grid (arXiv 2602.09014). In step
    ``i`` (source ``s0 = grid[i]``, end ``s1 = grid[i+1]``) the student predicts its mixture
    at the (detached) state; at ``points_per_step`` times ``s ~ U[s1, s0)`` (per sample) the
    student's state ``z_s`` follows from the detached closed form, and the loss is

    .. math::

        \| v_\theta(s) - v_T(z_s, s) \|^2 ,\qquad
        v_\theta(s) = \sum_k \pi_k m_k e^{g_k (s_0 - s)},

    averaged over elements, points and steps, then weighted per sample and averaged over
    the batch. The state carried to the next step is the student's closed-form step, or,
    with the schedule's probability (drawn per sample and step), ``teacher_substeps``
    teacher Euler steps over the same interval.

    Args:
        steps: number of student steps ``N`` on a uniform grid (2 when None); with
            ``grid``, None or ``len(grid) - 1``.
        grid: strictly decreasing times ``(N+1,)`` in ``[0, 1]``; uniform from 1 to 0 by
            default.
        points_per_step: velocity-matching times per step.
        mix_schedule: teacher mixing schedule (``TeacherMixSchedule()`` by default;
            ``TeacherMixSchedule(start=0.0)`` switches mixing off).
        teacher_substeps: teacher Euler steps per interval for mixed-in states.
        weighting: optional :class:`~mfcore.fields.Weighting`, called ``w(err, r, t)`` with
            the per-sample errors ``(B,)`` (detached) and the rollout's grid ends ``r =
            grid[-1]``, ``t = grid[0]`` as ``(B,)`` times, e.g. an
            :class:`~mfcore.losses.AdaptiveWeight`.

    Call:
        ``loss, metrics = loss_fn(student, teacher, noise, *, cond=None, step=None,
        generator=None)`` with ``noise (B, *Z)``; ``step`` is the training step for the
        schedule (an internal counter, advanced by each call, when None).
    """

    def __init__(
        self,
        *,
        steps: int | None = None,
        grid: Tensor | None = None,
        points_per_step: int = 2,
        mix_schedule: TeacherMixSchedule | None = None,
        teacher_substeps: int = 4,
        weighting: Weighting | None = None,
    ) -> None:
        if grid is not None or steps is not None:
            _resolve_grid(steps, grid, grid if grid is not None else torch.zeros(()))
        self.steps, self.grid = steps, grid
        self.points_per_step = check_positive_int("points_per_step", points_per_step)
        self.teacher_substeps = check_positive_int("teacher_substeps", teacher_substeps)
        if mix_schedule is not None:
            check_instance("mix_schedule", mix_schedule, TeacherMixSchedule, "a TeacherMixSchedule")
        self.mix_schedule = mix_schedule if mix_schedule is not None else TeacherMixSchedule()
        self.weighting = check_weighting(
            weighting,
            old_arity=1,
            old_form="weighting(per_sample_err)",
            adapt=_from_error_weighting,
        )
        self.num_calls = 0

    def state_dict(self) -> dict[str, Any]:
        """The call counter and the schedule, so training resumes exactly."""
        return {"num_calls": self.num_calls, "mix_schedule": self.mix_schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`."""
        check_state(type(self).__name__, state, ("num_calls", "mix_schedule"))
        self.num_calls = check_positive_int("num_calls", state["num_calls"], minimum=0)
        self.mix_schedule.load_state_dict(state["mix_schedule"])

    def __call__(
        self,
        student: ArcFlowStudent,
        teacher: VelocityField,
        noise: Tensor,
        *,
        cond: dict | None = None,
        step: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Roll the student from ``noise (B, *Z)``; returns the scalar loss and detached metrics."""
        check_tensor("noise", noise, ndim_min=1)
        cond = check_cond(cond)
        check_callable("student", student)
        check_callable("teacher", teacher)
        step = self.num_calls if step is None else check_positive_int("step", step, minimum=0)
        self.num_calls = step + 1
        p_mix = self.mix_schedule(step)
        times = _resolve_grid(self.steps, self.grid, noise)
        calls = _TeacherCalls(teacher, cond, generator)
        per_sample, stats = self._rollout(student, noise, times, p_mix, calls)
        suspects = [("noise", noise), ("the student's weights", student)]
        return self._reduce(per_sample, stats, p_mix, times, lambda: suspects)

    def _rollout(
        self, student, noise, times, p_mix, calls: _TeacherCalls
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-sample error ``(B,)`` summed over steps and points, plus rollout statistics."""
        z = noise.detach()
        err = torch.zeros(z.shape[0], dtype=compute_dtype(z.dtype), device=z.device)
        mixed, rate_sum = err.new_zeros(()), err.new_zeros(())
        n_steps = times.shape[0] - 1
        for i in range(n_steps):
            s0, s1 = _batch_time(times[i], z), _batch_time(times[i + 1], z)
            params = _call_student(student, z, s0, calls.cond)
            err = err + self._match(params, z, s1, calls)
            rate_sum = rate_sum + params.rates.detach().float().mean().to(err.dtype)
            with torch.no_grad():
                z, n_mixed = self._advance(params, z, s1, p_mix, calls)
            mixed = mixed + n_mixed
        stats = {
            "rate_mean": rate_sum / n_steps,
            "teacher_fraction": mixed / (n_steps * z.shape[0]),
        }
        return err / (n_steps * self.points_per_step), stats

    def _match(self, params, z, s1, calls: _TeacherCalls) -> Tensor:
        """Sum over sampled times of the per-sample velocity error ``(B,)``."""
        detached = params.detach()
        total = 0
        for _ in range(self.points_per_step):
            u = torch.rand(z.shape[0], generator=calls.generator, device=z.device, dtype=s1.dtype)
            s = s1 + u * (params.s0 - s1)
            with torch.no_grad():
                z_s = arc_step(detached, z, params.s0, s, validate=False)
                target = calls.teacher(z_s, s, **calls.cond)
            check_finite("teacher velocity", target)
            total = total + arc_velocity_error(params, s, target, validate=False)
        return total

    def _advance(self, params, z, s1, p_mix, calls: _TeacherCalls) -> tuple[Tensor, Tensor]:
        """The next state: the student's closed-form step, or teacher Euler steps (prob p_mix)."""
        z_next = arc_step(params.detach(), z, params.s0, s1, validate=False)
        if p_mix <= 0:
            return z_next, z_next.new_zeros((), dtype=torch.float32)
        draw = torch.rand(z.shape[0], generator=calls.generator, device=z.device) < p_mix
        if not bool(draw.any()):
            return z_next, z_next.new_zeros((), dtype=torch.float32)
        z_teacher = self._teacher_euler(calls, z, params.s0, s1)
        z_next = torch.where(expand_time(draw, z), z_teacher, z_next)
        return z_next, draw.float().sum()

    def _teacher_euler(self, calls: _TeacherCalls, z, s0, s1) -> Tensor:
        n = self.teacher_substeps
        h = (s1 - s0) / n
        work = z.to(h.dtype)  # the Euler state stays in the time's (compute) dtype
        for j in range(n):
            s = s0 + j * h
            v = calls.teacher(work.to(z.dtype), s, **calls.cond)
            work = work + expand_time(h, z) * v.to(h.dtype)
        return work.to(z.dtype)

    def _reduce(
        self, per_sample, stats, p_mix, times, suspects
    ) -> tuple[Tensor, dict[str, Tensor]]:
        check_finite("ArcFlow distillation loss", per_sample, suspects)
        if self.weighting is None:
            weight = torch.ones_like(per_sample)
        else:
            err = per_sample.detach()
            r, t = _batch_time(times[-1], err), _batch_time(times[0], err)
            weight = check_weights(self.weighting(err, r, t), err).detach().to(per_sample.dtype)
        loss = (weight * per_sample).mean()
        check_finite(
            "ArcFlow distillation loss", loss, lambda: [("the weighting's output", weight)]
        )
        metrics = {
            "loss": loss.detach(),
            "velocity_mse": per_sample.detach().mean(),
            "weight_mean": weight.mean(),
            "mix_probability": torch.tensor(p_mix),
            **{k: v.detach() for k, v in stats.items()},
        }
        return loss, metrics
