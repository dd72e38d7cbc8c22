""":class:`AlignmentLoss`: a critic applied along the few-step student's own trajectory
(trajectory distribution alignment, arXiv 2605.17834; :mod:`mfcore.critics`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from mfcore._checks import (
    check_callable,
    check_cond,
    check_finite,
    check_grid,
    check_instance,
    check_like,
    check_positive_int,
    check_state,
    check_tensor,
    check_weighting,
)
from mfcore.draws import Draws
from mfcore.fields import Critic, SampleCritic, TrainedCritic, Weighting
from mfcore.path import compute_dtype
from mfcore.solvers import meanflow_path
from mfcore.time import uniform_grid

__all__ = ["AlignmentLoss"]


def _from_time_weighting(old: Callable[[Tensor, Tensor], Tensor]) -> Weighting:
    """A weighting of the former critic signature ``w(s, r)`` as ``w(sq_err, r, t=s)``."""

    def weighting(sq_err: Tensor, r: Tensor, t: Tensor) -> Tensor:
        return old(t, r)

    return weighting


class AlignmentLoss:
    """Trajectory distribution alignment of a few-step MeanFlow student (arXiv 2605.17834).

    Runs the student for ``steps`` MeanFlow steps from noise (grid ``1 = t_0 > ... > t_K = 0``,
    :func:`~mfcore.solvers.sample_meanflow`) and applies the critic at every segment end
    ``z_{t_{i+1}}`` (segment ``[t_{i+1}, t_i]``), averaging over the ``K`` segments.

    - :meth:`critic_step` trains the critic's network ``critic_updates`` times on the
      detached trajectory (the second time scale; a no-op for
      :class:`~mfcore.kernel_critic.KernelCritic`);
    - :meth:`student_loss` is the student's loss, back-propagating through the whole
      trajectory; add ``lambda *`` it to :class:`~mfcore.losses.MeanFlowLoss`.

    Args:
        critic: a :class:`~mfcore.fields.Critic`:
            :class:`~mfcore.velocity_critics.FakeVelocityCritic`,
            :class:`~mfcore.velocity_critics.MeanFlowCritic`
            (:class:`~mfcore.fields.TrainedCritic` s) or
            :class:`~mfcore.kernel_critic.KernelCritic` (a :class:`~mfcore.fields.SampleCritic`).
        steps: student steps ``K`` on a uniform grid (1, 2, 4, ...); or give ``grid``.
        grid: optional ``(K + 1,)`` grid strictly decreasing from 1 to 0.
        weighting: optional :class:`~mfcore.fields.Weighting` ``w(sq_err, r, t) -> (B,)``,
            with ``r`` the segment end (see the critics for ``sq_err`` and ``t``).
        critic_updates: optimiser steps of the critic per :meth:`critic_step`.
        teacher_steps: Heun steps of the teacher when a sample critic needs reference
            samples and none are passed.

    :meth:`critic_step` and :meth:`student_loss` check their inputs; the critic then gets
    the segments of the grid checked here, and is not asked to check them again.

    Example:
        >>> import torch
        >>> from mfcore import AlignmentLoss, KernelCritic
        >>> student = lambda z, r, t: 0.9 * z
        >>> teacher = lambda z, t: z
        >>> align = AlignmentLoss(KernelCritic("mmd"), steps=2, teacher_steps=4)
        >>> align.critic_step(student, torch.randn(16, 2))  # no network to train
        (tensor(0.), {})
        >>> gen = torch.Generator().manual_seed(0)
        >>> loss, metrics = align.student_loss(
        ...     student, torch.randn(16, 2), teacher=teacher, generator=gen
        ... )
        >>> sorted(metrics)
        ['align_kernel', 'align_loss']
    """

    def __init__(
        self,
        critic: Critic,
        *,
        steps: int = 1,
        grid: Tensor | None = None,
        weighting: Weighting | None = None,
        critic_updates: int = 1,
        teacher_steps: int = 32,
    ) -> None:
        check_instance("critic", critic, Critic, "a mfcore.fields.Critic (FakeVelocityCritic, ...)")
        if grid is None:
            grid = uniform_grid(check_positive_int("steps", steps), dtype=torch.float64)
        else:
            grid = check_grid(grid, full_span=True)
        self.critic = critic
        self._trained = isinstance(critic, TrainedCritic)
        self._sampled = isinstance(critic, SampleCritic)
        self.grid = grid.detach().to(torch.float64).cpu()
        self.weighting = check_weighting(
            weighting, old_arity=2, old_form="weighting(s, r)", adapt=_from_time_weighting
        )
        self.critic_updates = check_positive_int("critic_updates", critic_updates)
        self.teacher_steps = check_positive_int("teacher_steps", teacher_steps)
        self.updates_done = 0

    @property
    def steps(self) -> int:
        """The number of student steps ``K``."""
        return self.grid.shape[0] - 1

    def _grid_for(self, noise: Tensor) -> Tensor:
        return self.grid.to(device=noise.device, dtype=compute_dtype(noise.dtype))

    def _segments(self, trajectory: Tensor, noise: Tensor):
        """Yield ``(z_end, r, t)`` per segment, times ``(B,)`` in at least fp32."""
        grid, batch = self._grid_for(noise), noise.shape[0]  # grid in the compute dtype
        for i in range(self.steps):
            t = grid[i].repeat(batch)
            r = grid[i + 1].repeat(batch)
            yield trajectory[i + 1], r, t

    def _trajectory(self, student, noise: Tensor, cond: dict, grad: bool) -> Tensor:
        with torch.enable_grad() if grad else torch.no_grad():
            _, traj = meanflow_path(
                student, noise, self._grid_for(noise), cond, return_trajectory=True
            )
        return traj

    def trajectory(
        self,
        student: Callable[..., Tensor],
        noise: Tensor,
        *,
        cond: Mapping[str, Any] | None = None,
        grad: bool = True,
    ) -> Tensor:
        """The student's ``K``-step trajectory from ``noise``, ``(K + 1, B, ...)`` (``[0]`` is
        ``noise``), attached to the student's graph when ``grad``.

        Computed once, it serves :meth:`critic_step` (which detaches it) and
        :meth:`student_loss` of the same training step, neither of which then runs the
        student again (the critic does not change the student's trajectory).
        """
        check_callable("student", student)
        check_tensor("noise", noise, ndim_min=1)
        return self._trajectory(student, noise, check_cond(cond), bool(grad))

    def _given(self, trajectory: object, noise: Tensor) -> Tensor:
        """A trajectory passed by the caller: ``(K + 1, *noise.shape)`` on noise's device."""
        expected = (self.steps + 1, *noise.shape)
        traj = check_tensor("trajectory", trajectory)
        if tuple(traj.shape) != expected or traj.device != noise.device:
            raise ValueError(
                f"trajectory must have shape (K + 1, *noise.shape) = {expected} on "
                f"{noise.device}, got {tuple(traj.shape)} on {traj.device}"
            )
        return traj

    def _critic_loss(self, traj: Tensor, noise: Tensor, cond: dict, generator: Draws) -> Tensor:
        losses = [
            self.critic.critic_loss(z, r, t, cond=cond, generator=generator)[0]
            for z, r, t in self._segments(traj, noise)
        ]
        return torch.stack(losses).mean()

    def critic_loss(
        self,
        student: Callable[..., Tensor],
        noise: Tensor,
        *,
        cond: Mapping[str, Any] | None = None,
        generator: Draws = None,
    ) -> Tensor:
        """One update's loss of the critic's network on the student's (detached) trajectory
        from ``noise``, with the network's graph: :meth:`critic_step` without the optimiser
        step, for a trainer that accumulates the gradient over micro-batches or processes
        and steps ``critic.optimizer`` itself. Arguments as :meth:`critic_step`.

        Returns:
            the mean over segments of the critic's flow-matching loss (0-dim).

        Raises:
            ValueError: for a critic without a network.
        """
        check_callable("student", student)
        check_tensor("noise", noise, ndim_min=1)
        cond = check_cond(cond)
        if not self._trained:
            raise ValueError(f"{type(self.critic).__name__} has no network to train")
        traj = self._trajectory(student, noise, cond, grad=False)
        return self._critic_loss(traj, noise, cond, generator)

    def critic_step(
        self,
        student: Callable[..., Tensor],
        noise: Tensor,
        *,
        cond: Mapping[str, Any] | None = None,
        generator: Draws = None,
        trajectory: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Train the critic's network on the student's (detached) trajectory from ``noise``.

        Args:
            student: ``u(z, r, t, **cond)``.
            noise: starting states ``(B, ...)`` at ``t = 1``.
            cond: conditioning for student and critic.
            generator: random generator (or :class:`~mfcore.draws.BatchRows`) for the
                re-noising.
            trajectory: the student's trajectory from ``noise`` if already computed
                (:meth:`trajectory`); default: run the student.

        Returns:
            ``(loss, metrics)``: the last update's loss (detached) and ``critic_fm`` /
            ``critic_updates``; ``(0, {})`` for a critic without a network.
        """
        check_callable("student", student)
        check_tensor("noise", noise, ndim_min=1)
        cond = check_cond(cond)
        if not self._trained:
            return noise.new_zeros(()), {}
        if trajectory is None:
            traj = self._trajectory(student, noise, cond, grad=False)
        else:
            traj = self._given(trajectory, noise).detach()
        loss = noise.new_zeros(())
        for _ in range(self.critic_updates):
            loss = check_finite(
                "the critic's loss",
                self._critic_loss(traj, noise, cond, generator),
                lambda: [
                    ("noise", noise),
                    ("the student's weights", student),
                    ("the student's trajectory", traj),
                    ("the critic's weights", getattr(self.critic, "fake", None)),
                ],
            )
            self.critic.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.critic.optimizer.step()
            self.critic.optimizer.zero_grad(set_to_none=True)  # no gradients held meanwhile
            self.updates_done += 1
        loss = loss.detach()
        updates = torch.full((), float(self.updates_done), device=loss.device)
        return loss, {"critic_fm": loss, "critic_updates": updates}

    def student_loss(
        self,
        student: Callable[..., Tensor],
        noise: Tensor,
        *,
        teacher: Callable[..., Tensor] | None = None,
        reference: Tensor | None = None,
        cond: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
        trajectory: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's alignment loss on its K-step trajectory from ``noise``.

        Args:
            student: ``u(z, r, t, **cond)``; gradients flow through every step.
            noise: starting states ``(B, ...)`` at ``t = 1``.
            teacher: ``v(z, t, **cond)``; required by the velocity critics, and by a sample
                critic when ``reference`` is not given.
            reference: teacher samples ``(B, ...)`` at ``t = 0``, shaped like ``noise``, for a
                sample critic (default: its ``reference_samples`` with ``teacher_steps``).
            cond: conditioning for all models.
            generator: random generator.
            trajectory: the student's trajectory from ``noise``, attached to its graph, if
                already computed (:meth:`trajectory`); default: run the student.

        Returns:
            ``(loss, metrics)``; ``loss`` is the mean over segments, ``metrics`` the
            critic's, averaged over segments, plus ``align_loss``.
        """
        check_callable("student", student)
        check_tensor("noise", noise, ndim_min=1)
        cond = check_cond(cond)
        check_callable("teacher", teacher, optional=True)
        if reference is not None:
            check_like("reference", reference, noise, "noise")
        if teacher is None and not (self._sampled and reference is not None):
            raise ValueError("student_loss needs a teacher (or a reference for a sample critic)")
        if self._sampled and reference is None:
            reference = self.critic.reference_samples(  # type: ignore[attr-defined]
                teacher, noise, steps=self.teacher_steps, cond=cond, generator=generator
            )
        if trajectory is None:
            traj = self._trajectory(student, noise, cond, grad=True)
        else:
            traj = self._given(trajectory, noise)
            if torch.is_grad_enabled() and not traj.requires_grad:
                raise ValueError(
                    "trajectory must be attached to the student's graph (trajectory(..., "
                    "grad=True)): a detached one would give the student no alignment gradient"
                )
        losses, sums = [], {}
        for z, r, t in self._segments(traj, noise):
            loss_i, m_i = self.critic.alignment_loss(
                z,
                r,
                t,
                teacher=teacher,
                weighting=self.weighting,
                reference=reference,
                cond=cond,
                generator=generator,
            )
            losses.append(loss_i)
            for key, value in m_i.items():
                sums[key] = sums.get(key, 0.0) + value / self.steps
        loss = torch.stack(losses).mean()
        suspects = [
            ("noise", noise),
            ("the student's weights", student),
            ("the student's trajectory", traj),
            ("the reference samples", reference),
            ("the critic's weights", getattr(self.critic, "fake", None)),
        ]
        check_finite("the alignment loss", loss, lambda: suspects)
        return loss, {"align_loss": loss.detach(), **sums}

    def state_dict(self) -> dict:
        """The critic's state (network and optimiser) and the count of critic updates."""
        return {"critic": self.critic.state_dict(), "updates_done": self.updates_done}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; raises ``KeyError`` naming a missing entry."""
        check_state("AlignmentLoss", state, ("critic", "updates_done"))
        self.critic.load_state_dict(state["critic"])
        self.updates_done = int(state["updates_done"])
