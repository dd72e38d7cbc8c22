"""Velocity critics of trajectory distribution alignment (:mod:`mfcore.critics`).

A *fake* velocity field ``v_fake(z, s)`` is fitted by flow matching to detached student
states re-noised inside their segment (:mod:`mfcore.renoise`); the teacher ``v`` describes
the teacher's marginals. Both transport ``z_s`` back to ``r``:

    zhat_fake = z_s - (s - r) v_fake(z_s, s),   zhat_teacher = z_s - (s - r) v(z_s, s),

and the student's state receives the gradient ``g = w (zhat_fake - zhat_teacher) / n``
through the surrogate ``L = 1/2 ||z_r - sg(z_r - g)||^2`` (so ``dL/dz_r = g``), with the
normaliser ``n = mean |z_r - zhat_teacher|`` per sample (DMD, arXiv 2311.18828, eq. 8) and an
optional weight ``w = weighting(||zhat_fake - zhat_teacher||^2, r, s)``
(:class:`~mfcore.fields.Weighting`, 1 by default). In the velocity convention
``zhat_fake - zhat_teacher = (s - r) (v - v_fake)``, a positive multiple of the gradient of
``KL(p_student || p_teacher)`` at ``s`` with respect to ``z_r``
(``score = -(z + (1 - s) v) / s``, ``dz_s/dz_r = a``): a step against ``g`` lowers the KL
(DMD; TDM, arXiv 2503.06674).

:class:`MeanFlowCritic` (Mean Flow Distillation, arXiv 2606.11155) takes both transports by
an ODE solve from ``s`` to ``r`` in a few steps, comparing the *average* velocities
``u(z_s, r, s)`` of teacher and fake; the paper shows this difference has a lower variance.

Their losses are batch means of per-sample terms, so data-parallel training (DDP, FSDP)
that averages gradients computes the single-process gradient of the global batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mfcore._checks import (
    check_instance,
    check_like,
    check_positive_int,
    check_real,
    check_state,
    check_weights,
    lookup,
)
from mfcore.draws import Draws, draw_normal
from mfcore.fields import Weighting
from mfcore.path import compute_dtype, expand_time
from mfcore.renoise import (
    draw_renoise_time,
    renoise,
    renoise_velocity,
    renoise_weight,
    surrogate_loss,
)
from mfcore.solvers import SOLVERS, solve_span

__all__ = ["FakeVelocityCritic", "MeanFlowCritic"]


class FakeVelocityCritic:
    """Fake-velocity critic (DMD arXiv 2311.18828, TDM arXiv 2503.06674; see the module doc).

    ``fake(z, s, **cond)`` is trained by flow matching (:meth:`critic_loss`) on detached
    student states re-noised inside their segment (weight
    :func:`~mfcore.renoise.renoise_weight`); the student's alignment gradient
    (:meth:`alignment_loss`) at a state ``z_r`` is

        g = w (zhat_fake - zhat_teacher) / n,   zhat = z_s - (s - r) v(z_s, s),

    i.e. ``(s - r) (v_teacher - v_fake)`` in velocity terms, with ``n`` DMD's normaliser.

    Args:
        fake: the fake velocity network ``fake(z, t, **cond) -> (B, ...)``, an ``nn.Module``.
        optimizer: the optimiser of ``fake``'s parameters (default Adam at ``lr``); it is
            part of :meth:`state_dict`.
        lr: learning rate of the default optimiser.
        normalize: divide ``g`` per sample by ``mean |z_r - zhat_teacher| + 1e-4``
            (DMD eq. 8).

    A :class:`~mfcore.fields.TrainedCritic`: :class:`~mfcore.critics.AlignmentLoss` calls it
    with checked segments ``r < t``, which it does not check again.

    Example:
        >>> import torch
        >>> from mfcore import AlignmentLoss, FakeVelocityCritic
        >>> class Fake(torch.nn.Module):  # v(z, t)
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(3, 2)
        ...     def forward(self, z, t):
        ...         return self.lin(torch.cat([z, t[:, None]], dim=1))
        >>> align = AlignmentLoss(FakeVelocityCritic(Fake(), lr=1e-3), steps=1)
        >>> student = lambda z, r, t: 0.5 * z
        >>> critic_loss, metrics = align.critic_step(student, torch.randn(16, 2))
        >>> sorted(metrics)
        ['critic_fm', 'critic_updates']
        >>> loss, metrics = align.student_loss(student, torch.randn(16, 2), teacher=lambda z, t: z)
        >>> sorted(metrics)
        ['align_g_rms', 'align_gap_rms', 'align_loss']
    """

    def __init__(
        self,
        fake: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        lr: float = 1e-3,
        normalize: bool = True,
    ) -> None:
        check_instance("fake", fake, nn.Module, "a torch.nn.Module")
        if optimizer is None:
            optimizer = torch.optim.Adam(
                fake.parameters(), lr=check_real("lr", lr, minimum=0.0, strict=True)
            )
        check_instance("optimizer", optimizer, torch.optim.Optimizer, "a torch.optim.Optimizer")
        self.fake = fake
        self.optimizer = optimizer
        self.normalize = bool(normalize)

    def _transport(self, v_fn, z_s: Tensor, s: Tensor, r: Tensor, cond: dict) -> Tensor:
        """``z_s - (s - r) v(z_s, s)``: one Euler step of ``v`` from ``s`` back to ``r``."""
        v = check_like("the critic's velocity", v_fn(z_s, s, **cond), z_s, "z_s")
        work = compute_dtype(z_s.dtype)
        return z_s.to(work) - expand_time((s - r).to(work), z_s) * v.to(work)

    def critic_loss(
        self,
        z_r: Tensor,
        r: Tensor,
        t: Tensor,
        *,
        cond: Mapping[str, Any] | None = None,
        generator: Draws = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Flow-matching loss of ``fake`` on the (detached) segment-end states ``z_r``.

        Draws ``s`` in ``(r, t]`` and ``eps``, regresses ``fake(z_s, s)`` onto
        :func:`~mfcore.renoise.renoise_velocity` with weight
        :func:`~mfcore.renoise.renoise_weight`; the minimiser is the velocity of the
        student's re-noised marginal.

        Args:
            z_r: student states ``(B, ...)`` at the segment ends ``r``.
            r: segment ends ``(B,)``, ``r < t``.
            t: segment starts ``(B,)``.
            cond: conditioning for ``fake``.
            generator: random generator (or :class:`~mfcore.draws.BatchRows`) for ``s``
                and ``eps``.

        Returns:
            ``(loss, metrics)``: the weighted mean over the batch of the squared error
            summed over non-batch dims, and ``{"critic_fm": loss}`` detached.
        """
        cond = cond or {}
        z_r = z_r.detach()
        s = draw_renoise_time(r, t, generator)
        noise = draw_normal(z_r.shape, generator, device=z_r.device, dtype=z_r.dtype)
        z_s = renoise(z_r, r, s, noise, validate=False)
        target = renoise_velocity(z_r, r, s, noise, validate=False)
        pred = check_like("the output of fake", self.fake(z_s, s, **cond), z_s, "z_s")
        work = compute_dtype(pred.dtype)
        sq = (pred.to(work) - target.to(work)).square().flatten(1).sum(1)
        loss = (renoise_weight(r, s, validate=False).to(work) * sq).mean()
        return loss, {"critic_fm": loss.detach()}

    def alignment_loss(
        self,
        z_r: Tensor,
        r: Tensor,
        t: Tensor,
        *,
        teacher: Callable[..., Tensor],
        weighting: Weighting | None = None,
        reference: Tensor | None = None,
        cond: Mapping[str, Any] | None = None,
        generator: Draws = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's surrogate loss at segment-end states ``z_r`` (attached).

        Args:
            z_r: student states ``(B, ...)`` at ``r``, attached to the student's graph.
            r: segment ends ``(B,)``; ``t``: segment starts ``(B,)``, ``r < t``.
            teacher: velocity field ``teacher(z, t, **cond)``.
            weighting: optional :class:`~mfcore.fields.Weighting`, called ``w(||gap||^2, r,
                s)`` with the unnormalised gap of each sample, multiplying ``g`` (default 1).
            reference: unused (kept for a common call with :class:`~mfcore.critics.KernelCritic`).
            cond: conditioning for teacher and fake.
            generator: random generator (or :class:`~mfcore.draws.BatchRows`) for ``s``
                and ``eps``.

        Returns:
            ``(loss, metrics)``: the batch mean of :func:`~mfcore.renoise.surrogate_loss`
            and detached ``align_g_rms`` (rms of ``g``) and ``align_gap_rms`` (rms of the
            unnormalised difference ``zhat_fake - zhat_teacher``).
        """
        del reference
        cond = cond or {}
        s = draw_renoise_time(r, t, generator)
        noise = draw_normal(z_r.shape, generator, device=z_r.device, dtype=z_r.dtype)
        with torch.no_grad():
            z_s = renoise(z_r.detach(), r, s, noise, validate=False)
            hat_teacher = self._transport(teacher, z_s, s, r, cond)
            hat_fake = self._transport(self.fake, z_s, s, r, cond)
            gap = hat_fake - hat_teacher
            g = gap
            if self.normalize:
                scale = (z_r.detach().to(gap.dtype) - hat_teacher).abs().flatten(1).mean(1)
                g = g / expand_time(scale + 1e-4, g)
            if weighting is not None:
                gap_sq = gap.square().flatten(1).sum(1)
                w = check_weights(weighting(gap_sq, r, s), gap_sq)
                g = g * expand_time(w.to(g.dtype), g)
        loss = surrogate_loss(z_r, g, validate=False).mean()
        metrics = {
            "align_g_rms": g.square().mean().sqrt(),
            "align_gap_rms": gap.square().mean().sqrt(),
        }
        return loss, metrics

    def state_dict(self) -> dict:
        """The fake network's and its optimiser's states."""
        return {"fake": self.fake.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; raises ``KeyError`` naming a missing entry."""
        check_state(type(self).__name__, state, ("fake", "optimizer"))
        self.fake.load_state_dict(state["fake"])
        # torch's optimiser keeps the given tensors (no copy): copy, so two critics never alias
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))


class MeanFlowCritic(FakeVelocityCritic):
    """Mean-flow critic (Mean Flow Distillation, arXiv 2606.11155).

    As :class:`FakeVelocityCritic`, but both transports from ``s`` back to ``r`` integrate
    their ODE in ``ode_steps`` steps of ``method``, so ``zhat_fake - zhat_teacher =
    (s - r) (u_teacher(z_s, r, s) - u_fake(z_s, r, s))``: the difference of the two *average*
    velocities over ``[r, s]``. With ``ode_steps = 1`` and ``"euler"`` it is the fake-velocity
    critic.

    Args:
        fake, optimizer, lr, normalize: as :class:`FakeVelocityCritic`.
        ode_steps: solver steps of each transport.
        method: a solver of :data:`mfcore.solvers.ODE_METHODS`.
    """

    def __init__(
        self,
        fake: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        lr: float = 1e-3,
        normalize: bool = True,
        ode_steps: int = 4,
        method: str = "heun",
    ) -> None:
        super().__init__(fake, optimizer, lr=lr, normalize=normalize)
        self.ode_steps = check_positive_int("ode_steps", ode_steps)
        self._step = lookup("method", method, SOLVERS)
        self.method = method

    def _transport(self, v_fn, z_s: Tensor, s: Tensor, r: Tensor, cond: dict) -> Tensor:
        """The ODE solution of ``v`` from ``s`` back to ``r`` (``ode_steps`` steps), in the
        compute dtype."""
        steps, step, name = self.ode_steps, self._step, "the critic's velocity"
        return solve_span(
            v_fn, z_s, s, r, steps=steps, step=step, cond=cond, model_dtype=z_s.dtype, name=name
        )
