"""Trajectory distribution alignment: critics that pull a few-step student toward the teacher.

MeanFlow regression alone is mean-seeking at one or two steps on multi-modal targets
(arXiv 2605.17834, Sec. 4): where the teacher's flow map is nearly discontinuous the
student averages it and puts samples between the modes. These objectives add a
*distribution-level* signal on the states of the student's own K-step trajectory
``z_{t_0} = eps, z_{t_1}, ..., z_{t_K}`` (grid ``1 = t_0 > ... > t_K = 0``), so every
segment end ``z_{t_{i+1}}`` is pushed toward the teacher's marginal at ``t_{i+1}``
(trajectory distribution matching, TDM, arXiv 2503.06674).

**Re-noising within a segment.** A state ``z_r`` of the path ``z_r = (1 - r) x + r e``
moves to ``s >= r`` along the same path by the Gaussian transition

    z_s = a z_r + sigma eps,   a = (1 - s) / (1 - r),   sigma^2 = s^2 - a^2 r^2,

(:func:`renoise`), so ``z_s = (1 - s) x + s e'`` with ``e' ~ N(0, I)``. Its velocity
``dz_s/ds = a' z_r + sigma' eps`` (:func:`renoise_velocity`) has, conditionally on ``z_s``,
the mean of the path's velocity ``E[e' - x | z_s]``: regressing a network onto it is flow
matching of the re-noised distribution (for ``r = 0`` it is the usual ``eps - x``).

**Velocity critics** (DMD arXiv 2311.18828, TDM arXiv 2503.06674). A *fake* velocity field
``v_fake(z, s)`` is fitted by that flow matching to detached student states; the teacher
``v`` describes the teacher's marginals. Both transport ``z_s`` back to ``r``:

    zhat_fake = z_s - (s - r) v_fake(z_s, s),   zhat_teacher = z_s - (s - r) v(z_s, s),

and the student's state receives the gradient ``g = w (zhat_fake - zhat_teacher) / n``
through the surrogate ``L = 1/2 ||z_r - sg(z_r - g)||^2`` (so ``dL/dz_r = g``), with the
normaliser ``n = mean |z_r - zhat_teacher|`` per sample (DMD, eq. 8) and an optional weight
``w = weighting(||zhat_fake - zhat_teacher||^2, r, s)`` (:class:`~mfcore.fields.Weighting`,
1 by default). In the velocity
convention ``zhat_fake - zhat_teacher = (s - r) (v - v_fake)``, which is a positive multiple
of the gradient of ``KL(p_student || p_teacher)`` at ``s`` with respect to ``z_r``
(``score = -(z + (1 - s) v) / s``, ``dz_s/dz_r = a``): a step against ``g`` lowers the KL.

**Mean-flow critic** (Mean Flow Distillation, arXiv 2606.11155): the same with both
transports taken by an ODE solve from ``s`` to ``r`` in a few steps, i.e. comparing the
*average* velocities ``u(z_s, r, s)`` of teacher and fake instead of their velocities at
one time; the paper shows this difference has a lower variance.

**Kernel critic**: no network; the squared MMD (mixture of RBF bandwidths, Gretton et al.,
arXiv 0805.2368) or the energy distance (Szekely & Rizzo 2013) between the student's
segment-end states and teacher samples noised to the same time. Useful in low dimensions
and as a cross-check of the network critics.

:class:`AlignmentLoss` composes a critic with the student's K-step sampler
(:func:`mfcore.solvers.sample_meanflow` with ``enable_grad=True``) and exposes
``critic_step(...)`` and ``student_loss(...)``, each returning ``(loss, metrics)``; the seed
method trains ``MeanFlowLoss + lambda * AlignmentLoss``. Every draw takes a
:class:`~mfcore.draws.BatchRows` in place of a generator, so a data-parallel run draws what
one process would for the global batch.

**Data parallelism.** The velocity critics' losses are batch means of per-sample terms, so
a run that averages gradients over processes (DDP, FSDP) computes the single-process
gradient of the global batch. The kernel critic is not: its discrepancy compares the
student's *set* of states with the teacher's, so per process it compares the local sets,
and the average of local discrepancies is not the discrepancy of the global sets (its
within-set terms lose the cross-process pairs). To get the global one, all-gather ``z_r``
and ``reference`` with the autograd-aware ``torch.distributed.nn.functional.all_gather``
before :func:`kernel_discrepancy`; ``mfcore-distill`` offers only the velocity critics.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from mfcore._checks import (
    check_callable,
    check_cond,
    check_finite,
    check_grid,
    check_interval,
    check_like,
    check_positive_int,
    check_real,
    check_tensor,
    check_time,
    check_weighting,
    check_weights,
    compute_dtype,
    expand_time,
    lookup,
)
from mfcore.draws import Draws, draw_normal, draw_uniform
from mfcore.fields import Critic, SampleCritic, TrainedCritic, Weighting
from mfcore.solvers import SOLVERS, meanflow_path, sample_teacher, solve_span
from mfcore.time import uniform_grid

__all__ = [
    "renoise",
    "renoise_velocity",
    "renoise_weight",
    "surrogate_loss",
    "kernel_discrepancy",
    "FakeVelocityCritic",
    "MeanFlowCritic",
    "KernelCritic",
    "AlignmentLoss",
]

_MIN_FRACTION = 1e-3  # smallest (s - r) / (t - r) drawn, keeping sigma > 0


# --------------------------------------------------------------------------- validation


def _check_positive(name: str, value: object) -> float:
    return check_real(name, value, minimum=0.0, strict=True)


# --------------------------------------------------------------------------- re-noising


def _transition(r: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(a, sigma, da/ds, dsigma/ds)`` of the path's transition from ``r`` to ``s``."""
    one_minus_r = 1.0 - r
    a = (1.0 - s) / one_minus_r
    var = (s * s - (a * r) ** 2).clamp_min(0.0)
    sigma = var.sqrt()
    da = -1.0 / one_minus_r
    dvar_half = s - a * da * r * r  # (1/2) d(sigma^2)/ds
    dsigma = dvar_half / sigma
    return a, sigma, da.expand_as(a), dsigma


def _check_renoise(z_r: Tensor, r: Tensor, s: Tensor, noise: Tensor, strict: bool) -> None:
    """``r <= s`` (``r < s`` for the velocity, singular at ``s = r``) and ``r < 1``."""
    check_tensor("z_r", z_r, ndim_min=1)
    check_interval(r, s, z_r, names=("r", "s"), strict=strict)
    check_like("noise", noise, z_r, "z_r")
    if not strict and bool((r >= 1).any()):  # strict: r < s <= 1 already
        raise ValueError("r must be < 1 (the transition from pure noise is undefined)")


def renoise(z_r: Tensor, r: Tensor, s: Tensor, noise: Tensor) -> Tensor:
    """Move ``z_r`` from time ``r`` to ``s >= r`` along the path ``z = (1 - t) x + t e``.

    ``z_s = a z_r + sigma eps`` with ``a = (1 - s) / (1 - r)`` and
    ``sigma^2 = s^2 - a^2 r^2``: if ``z_r = (1 - r) x + r e`` then
    ``z_s = (1 - s) x + s e'`` with ``e' ~ N(0, I)`` (TDM's in-segment re-noising,
    arXiv 2503.06674). ``s = r`` returns ``z_r``; ``r = 0`` gives ``(1 - s) z_0 + s eps``.

    Args:
        z_r: states ``(B, ...)`` at time ``r``.
        r: times ``(B,)`` in ``[0, 1)``.
        s: times ``(B,)`` with ``r <= s <= 1``.
        noise: ``eps`` ``(B, ...)``, standard normal.

    Returns:
        ``z_s`` ``(B, ...)`` in ``z_r``'s dtype (coefficients in fp32 at least); differentiable
        with respect to ``z_r``.
    """
    _check_renoise(z_r, r, s, noise, strict=False)
    return _renoise(z_r, r, s, noise)


def _renoise(z_r: Tensor, r: Tensor, s: Tensor, noise: Tensor) -> Tensor:
    """:func:`renoise` on trusted arguments."""
    work = compute_dtype(z_r.dtype)
    a, sigma, _, _ = _transition(r.to(work), s.to(work))
    z_s = expand_time(a, z_r) * z_r.to(work) + expand_time(sigma, z_r) * noise.to(work)
    return z_s.to(z_r.dtype)


def renoise_velocity(z_r: Tensor, r: Tensor, s: Tensor, noise: Tensor) -> Tensor:
    """Velocity ``dz_s/ds = a' z_r + sigma' eps`` of :func:`renoise` (the critic's target).

    With ``a' = -1 / (1 - r)`` and ``sigma' = (s + (1 - s) r^2 / (1 - r)^2) / sigma``. Given
    ``z_s`` its mean is the path's velocity ``E[e' - x | z_s]`` (because
    ``a a' r^2 + sigma sigma' = s``), so it is an unbiased flow-matching target for the
    re-noised distribution; for ``r = 0`` it is ``eps - z_0``.

    Args:
        z_r: states ``(B, ...)`` at time ``r``.
        r: times ``(B,)`` in ``[0, 1)``.
        s: times ``(B,)`` with ``r < s <= 1`` (``sigma' = inf`` at ``s = r``).
        noise: ``eps`` ``(B, ...)``, the same as given to :func:`renoise`.

    Returns:
        the velocity ``(B, ...)`` in ``z_r``'s dtype.
    """
    _check_renoise(z_r, r, s, noise, strict=True)
    return _renoise_velocity(z_r, r, s, noise)


def _renoise_velocity(z_r: Tensor, r: Tensor, s: Tensor, noise: Tensor) -> Tensor:
    """:func:`renoise_velocity` on trusted arguments."""
    work = compute_dtype(z_r.dtype)
    _, _, da, dsigma = _transition(r.to(work), s.to(work))
    vel = expand_time(da, z_r) * z_r.to(work) + expand_time(dsigma, z_r) * noise.to(work)
    return vel.to(z_r.dtype)


def renoise_weight(r: Tensor, s: Tensor) -> Tensor:
    """Flow-matching weight ``sigma^2 / s^2`` of the re-noised target, ``(B,)`` in ``(0, 1]``.

    The share of ``s^2`` contributed by fresh noise: 1 for ``r = 0`` (plain flow matching),
    and it cancels the ``1 / sigma^2`` growth of the target's variance as ``s -> r``.
    """
    check_time("r", r)
    check_time("s", s, batch=r.shape[0])
    return _renoise_weight(r, s)


def _renoise_weight(r: Tensor, s: Tensor) -> Tensor:
    """:func:`renoise_weight` on trusted arguments."""
    work = compute_dtype(r.dtype)
    _, sigma, _, _ = _transition(r.to(work), s.to(work))
    return (sigma / s.to(work)).square().to(r.dtype)


def _draw_renoise_time(r: Tensor, t: Tensor, generator: Draws) -> Tensor:
    """``s = r + (t - r) u`` with ``u ~ U[1e-3, 1]``: a time inside each segment, above ``r``."""
    u = draw_uniform(r.shape, generator, device=r.device, dtype=compute_dtype(r.dtype))
    u = _MIN_FRACTION + (1.0 - _MIN_FRACTION) * u
    # Kept in the compute dtype: cast back to bf16, s would round onto r for short segments.
    return (r.to(u.dtype) + (t - r).to(u.dtype) * u).clamp(max=1.0)


def surrogate_loss(x: Tensor, g: Tensor) -> Tensor:
    """Per-sample ``1/2 ||x - sg(x - g)||^2`` (summed over non-batch dims), ``(B,)``.

    Its value is ``||g||^2 / 2`` and its gradient with respect to ``x`` is ``g`` (DMD,
    arXiv 2311.18828): a way to inject a given gradient into any graph.

    Args:
        x: tensor ``(B, ...)`` attached to the graph.
        g: the gradient to inject, ``(B, ...)`` (detached here).
    """
    check_tensor("x", x, ndim_min=1)
    check_like("g", g, x, "x")
    return _surrogate(x, g)


def _surrogate(x: Tensor, g: Tensor) -> Tensor:
    """:func:`surrogate_loss` on trusted arguments."""
    work = compute_dtype(x.dtype)
    xw = x.to(work)
    return 0.5 * (xw - (xw - g.to(work)).detach()).square().flatten(1).sum(1)


# --------------------------------------------------------------------------- velocity critics


class FakeVelocityCritic:
    """Fake-velocity critic (DMD arXiv 2311.18828, TDM arXiv 2503.06674; see the module doc).

    ``fake(z, s, **cond)`` is trained by flow matching (:meth:`critic_loss`) on detached
    student states re-noised inside their segment (weight :func:`renoise_weight`); the
    student's alignment gradient (:meth:`alignment_loss`) at a state ``z_r`` is

        g = w (zhat_fake - zhat_teacher) / n,   zhat = z_s - (s - r) v(z_s, s),

    i.e. ``(s - r) (v_teacher - v_fake)`` in velocity terms, with ``n`` DMD's normaliser.

    Args:
        fake: the fake velocity network ``fake(z, t, **cond) -> (B, ...)``, an ``nn.Module``.
        optimizer: the optimiser of ``fake``'s parameters (default Adam at ``lr``); it is
            part of :meth:`state_dict`.
        lr: learning rate of the default optimiser.
        normalize: divide ``g`` per sample by ``mean |z_r - zhat_teacher| + 1e-4`` (DMD eq. 8).

    A :class:`~mfcore.fields.TrainedCritic`: :class:`AlignmentLoss` calls it with checked
    segments ``r < t``, which it does not check again.

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
        if not isinstance(fake, nn.Module):
            raise TypeError(f"fake must be a torch.nn.Module, got {type(fake).__name__}")
        if optimizer is None:
            optimizer = torch.optim.Adam(fake.parameters(), lr=_check_positive("lr", lr))
        elif not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
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
        :func:`renoise_velocity` with weight :func:`renoise_weight`; the minimiser is the
        velocity of the student's re-noised marginal.

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
        s = _draw_renoise_time(r, t, generator)
        noise = draw_normal(z_r.shape, generator, device=z_r.device, dtype=z_r.dtype)
        z_s = _renoise(z_r, r, s, noise)
        target = _renoise_velocity(z_r, r, s, noise)
        pred = check_like("the output of fake", self.fake(z_s, s, **cond), z_s, "z_s")
        work = compute_dtype(pred.dtype)
        sq = (pred.to(work) - target.to(work)).square().flatten(1).sum(1)
        loss = (_renoise_weight(r, s).to(work) * sq).mean()
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
            reference: unused (kept for a common call with :class:`KernelCritic`).
            cond: conditioning for teacher and fake.
            generator: random generator (or :class:`~mfcore.draws.BatchRows`) for ``s``
                and ``eps``.

        Returns:
            ``(loss, metrics)``: the batch mean of :func:`surrogate_loss` and detached
            ``align_g_rms`` (rms of ``g``) and ``align_gap_rms`` (rms of the unnormalised
            difference ``zhat_fake - zhat_teacher``).
        """
        del reference
        cond = cond or {}
        s = _draw_renoise_time(r, t, generator)
        noise = draw_normal(z_r.shape, generator, device=z_r.device, dtype=z_r.dtype)
        with torch.no_grad():
            z_s = _renoise(z_r.detach(), r, s, noise)
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
        loss = _surrogate(z_r, g).mean()
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
        for key in ("fake", "optimizer"):
            if key not in state:
                raise KeyError(f"critic state is missing {key!r}")
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
        return solve_span(v_fn, z_s, s, r, steps, step, cond, z_s.dtype, name)


# --------------------------------------------------------------------------- kernel critic


def _rbf_mixture(d_sq: Tensor, bandwidths: tuple[float, ...]) -> Tensor:
    """``mean_h exp(-d^2 / (2 h^2))``: a mixture of RBF kernels."""
    return sum(torch.exp(-d_sq / (2.0 * h * h)) for h in bandwidths) / len(bandwidths)


def _negative_distance(d_sq: Tensor, bandwidths: tuple[float, ...]) -> Tensor:
    """``-sqrt(d^2 + 1e-12)``: the energy distance's kernel (smoothed at 0)."""
    del bandwidths
    return -(d_sq + 1e-12).sqrt()


#: The kernels of :func:`kernel_discrepancy` by name: ``kernel(d_sq, bandwidths)`` of the
#: squared distances.
KERNELS: Mapping[str, Callable[[Tensor, tuple[float, ...]], Tensor]] = MappingProxyType(
    {"mmd": _rbf_mixture, "energy": _negative_distance}
)


def _pairwise_sq(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances ``(N, M)`` between flattened rows (exact, no matmul trick)."""
    return (a[:, None, :] - b[None, :, :]).square().sum(-1)


def kernel_discrepancy(
    a: Tensor,
    b: Tensor,
    *,
    kind: str = "mmd",
    bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0),
) -> Tensor:
    """A differentiable discrepancy between two clouds: squared MMD or energy distance.

    - ``"mmd"``: the unbiased squared MMD (Gretton et al., arXiv 0805.2368, eq. 3) with
      ``k(x, y) = mean_h exp(-||x - y||^2 / (2 h^2))`` over the ``bandwidths``;
    - ``"energy"``: ``2 E||a - b|| - E||a - a'|| - E||b - b'||`` (Szekely & Rizzo 2013),
      within-cloud means over distinct pairs, with ``||.||`` smoothed as
      ``sqrt(d^2 + 1e-12)`` so its gradient exists at 0.

    Both vanish in expectation iff the distributions agree (characteristic kernels).

    Args:
        a: points ``(N, ...)`` (flattened per sample), ``N >= 2``; gradients flow into it.
        b: points ``(M, ...)`` with the same per-sample shape, ``M >= 2``.
        kind: ``"mmd"`` or ``"energy"``.
        bandwidths: positive RBF bandwidths for ``"mmd"``.

    Returns:
        a 0-dim tensor (fp32 at least).
    """
    check_tensor("a", a, ndim_min=1)
    check_tensor("b", b, ndim_min=1)
    kernel = lookup("kind", kind, KERNELS)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"a and b must share the per-sample shape, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"a and b need at least 2 points each, got {a.shape[0]}, {b.shape[0]}")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}")
    return _discrepancy(a, b, kernel, _check_bandwidths(bandwidths))


def _check_bandwidths(bandwidths: Sequence[float]) -> tuple[float, ...]:
    bw = tuple(_check_positive("bandwidths", h) for h in bandwidths)
    if not bw:
        raise ValueError("bandwidths must not be empty")
    return bw


def _discrepancy(a: Tensor, b: Tensor, kernel, bandwidths: tuple[float, ...]) -> Tensor:
    """:func:`kernel_discrepancy` on trusted arguments (``kernel`` of :data:`KERNELS`)."""
    work = compute_dtype(a.dtype)
    x, y = a.flatten(1).to(work), b.flatten(1).to(work)
    within_x, within_y = _within(x, kernel, bandwidths), _within(y, kernel, bandwidths)
    return within_x + within_y - 2.0 * kernel(_pairwise_sq(x, y), bandwidths).mean()


def _within(x: Tensor, kernel, bandwidths: tuple[float, ...]) -> Tensor:
    """The kernel's mean over the distinct pairs of ``x`` (masked, not indexed: no sync)."""
    n = x.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    return torch.where(off, kernel(_pairwise_sq(x, x), bandwidths), 0.0).sum() / (n * (n - 1))


class KernelCritic:
    """Kernel critic: :func:`kernel_discrepancy` between student and teacher states.

    At a segment end ``r`` it compares the student's states ``z_r`` with teacher samples
    ``x`` noised to the same time, ``(1 - r) x + r eps`` (exact samples of the teacher's
    marginal at ``r`` when ``x`` are the teacher's samples). No network, no critic step.

    Args:
        kind: ``"mmd"`` (mixture of RBF kernels) or ``"energy"``.
        bandwidths: RBF bandwidths for ``"mmd"`` (suited to unit-variance data by default).

    A :class:`~mfcore.fields.SampleCritic`: :class:`AlignmentLoss` calls it with checked
    segments and reference samples, which it does not check again.
    """

    def __init__(
        self, kind: str = "mmd", bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0)
    ) -> None:
        self._kernel = lookup("kind", kind, KERNELS)
        self.kind = kind
        self.bandwidths = _check_bandwidths(bandwidths)

    def reference_samples(
        self,
        teacher: Callable[..., Tensor],
        like: Tensor,
        *,
        steps: int,
        cond: dict[str, Any],
        generator: Draws,
    ) -> Tensor:
        """Teacher samples at ``t = 0`` shaped like ``like``: a ``steps``-step Heun solve from
        fresh noise drawn from ``generator``."""
        fresh = draw_normal(like.shape, generator, device=like.device, dtype=like.dtype)
        return sample_teacher(teacher, fresh, steps, method="heun", cond=cond)

    def alignment_loss(
        self,
        z_r: Tensor,
        r: Tensor,
        t: Tensor,
        *,
        teacher: Callable[..., Tensor] | None = None,
        weighting: Weighting | None = None,
        reference: Tensor | None = None,
        cond: Mapping[str, Any] | None = None,
        generator: Draws = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Discrepancy between ``z_r`` and ``reference`` noised to ``r``.

        Args:
            z_r: student states ``(B, ...)`` at ``r`` (attached).
            r: segment ends ``(B,)``; ``t``: segment starts ``(B,)``, ``r < t``.
            teacher, cond: unused (the reference stands for the teacher).
            weighting: optional :class:`~mfcore.fields.Weighting`, called ``w(d^2, r, r)``
                with each state's squared distance ``d^2`` to its nearest noised reference
                sample; the weights' batch mean multiplies the discrepancy.
            reference: teacher samples at ``t = 0``, ``(B, ...)`` like ``z_r``.
            generator: random generator (or :class:`~mfcore.draws.BatchRows`) for the noise.

        Returns:
            ``(loss, {"align_kernel": loss})``.
        """
        del teacher, cond
        if reference is None:
            raise ValueError("KernelCritic needs reference (teacher samples at t = 0)")
        noise = draw_normal(z_r.shape, generator, device=z_r.device, dtype=z_r.dtype)
        work = compute_dtype(z_r.dtype)
        rr = expand_time(r.to(work), z_r)
        ref_r = (1.0 - rr) * reference.detach().to(work) + rr * noise.to(work)
        loss = _discrepancy(z_r, ref_r, self._kernel, self.bandwidths)
        if weighting is not None:
            with torch.no_grad():
                work_z = z_r.detach().flatten(1).to(work)
                nearest = _pairwise_sq(work_z, ref_r.flatten(1)).min(1).values
            loss = loss * check_weights(weighting(nearest, r, r), nearest).mean()
        return loss, {"align_kernel": loss.detach()}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state


# --------------------------------------------------------------------------- AlignmentLoss


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
      detached trajectory (the second time scale; a no-op for :class:`KernelCritic`);
    - :meth:`student_loss` is the student's loss, back-propagating through the whole
      trajectory; add ``lambda *`` it to :class:`~mfcore.losses.MeanFlowLoss`.

    Args:
        critic: a :class:`~mfcore.fields.Critic`: :class:`FakeVelocityCritic`,
            :class:`MeanFlowCritic` (:class:`~mfcore.fields.TrainedCritic` s) or
            :class:`KernelCritic` (a :class:`~mfcore.fields.SampleCritic`).
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
        if not isinstance(critic, Critic):
            raise TypeError(
                "critic must be a mfcore.fields.Critic (FakeVelocityCritic, MeanFlowCritic, "
                f"KernelCritic, ...), got {type(critic).__name__}"
            )
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
            _, traj = meanflow_path(student, noise, self._grid_for(noise), cond, None, True)
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
        for key in ("critic", "updates_done"):
            if key not in state:
                raise KeyError(f"AlignmentLoss state is missing {key!r}")
        self.critic.load_state_dict(state["critic"])
        self.updates_done = int(state["updates_done"])
