"""Average-velocity targets for training a MeanFlow student, and the warm-up switch.

Every target turns a state ``z_t``, an interval ``[r, t]`` and the velocity ``v`` at
``(z_t, t)`` into a detached regression target ``u_tgt`` for the student
``u(z_t, r, t)``:

- **differential** (MeanFlow, Geng et al., arXiv 2505.13447, eq. 10):
  ``u_tgt = v - (t - r) du/dt`` with ``du/dt`` the JVP along ``(v, 0, 1)``; exact at the
  fixed point, but its stop-gradient term is only as good as the current student;
- **teacher ODE** (discrete): integrate the teacher from t to r and take the secant,
  ``u_tgt = (z_t - z_r) / (t - r)`` (``v`` where ``r = t``): no JVP, no student in the
  target;
- **interval splitting** (discrete; SplitMeanFlow, arXiv 2507.16884, eq. 6): for
  ``r <= s <= t``, ``(t - r) u(z_t, r, t) = (t - s) u(z_t, s, t) + (s - r) u(z_s, r, s)``,
  with the teacher on the first piece, on both, or on neither (pure self-consistency).

The warm-up switch (arXiv 2605.17834, Sec. 3), which trains on a discrete target first and
then switches to the differential one, is :class:`mfcore.warmup.WarmupTarget` (built on this
module, which does not import it back), with the target-agreement signals, gate and guard
that make it safe.

Pure functions come first (each checks its arguments); the target objects on top are
:class:`~mfcore.fields.Target` s (the discrete ones :class:`~mfcore.fields.DiscreteTarget` s),
called by :class:`~mfcore.losses.MeanFlowLoss` with arguments it has checked:
``target(student, point, *, teacher=None, generator=None, step=None) -> TargetOutput``, the
point a :class:`~mfcore.path.FlowPoint` ``(z_t, r, t, v, cond)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from mfcore._checks import (
    check_cond,
    check_interval,
    check_like,
    check_positive_int,
    check_real,
    check_tensor,
    lookup,
)
from mfcore.fields import TargetOutput
from mfcore.jvp import JVP_BACKENDS, JvpOptions, along_flow, restore_rng, rng_state
from mfcore.path import FlowPoint, compute_dtype, expand_time
from mfcore.solvers import SOLVERS, cond_rows, solve_span, span_rows

__all__ = [
    "TargetOutput",
    "differential_target",
    "teacher_ode_target",
    "split_target",
    "DifferentialTarget",
    "TeacherODETarget",
    "SplitTarget",
]


# --------------------------------------------------------------------------- pure functions


def differential_target(u: Tensor, dudt: Tensor, v: Tensor, r: Tensor, t: Tensor) -> Tensor:
    """MeanFlow's target ``u_tgt = sg(v - (t - r) du/dt)`` (arXiv 2505.13447, eq. 10).

    Args:
        u: the student's prediction ``(B, ...)`` (fixes the output dtype and shape).
        dudt: total derivative ``(B, ...)`` along ``(v, 0, 1)``.
        v: velocity at ``(z_t, t)``, ``(B, ...)``.
        r, t: ``(B,)`` times with ``r <= t``.

    Returns:
        the detached target ``(B, ...)`` in the compute dtype of ``u`` (fp32 at least, fp64
        stays fp64).

    Example:
        >>> import torch
        >>> from mfcore import differential_target
        >>> u, dudt, v = torch.zeros(2, 3), torch.full((2, 3), 2.0), torch.ones(2, 3)
        >>> r, t = torch.tensor([0.0, 0.5]), torch.tensor([0.25, 0.5])
        >>> differential_target(u, dudt, v, r, t)  # v - (t - r) du/dt
        tensor([[0.5000, 0.5000, 0.5000],
                [1.0000, 1.0000, 1.0000]])
    """
    check_tensor("u", u, ndim_min=1)
    check_like("dudt", dudt, u, "u")
    check_like("v", v, u, "u")
    r, t = check_interval(r, t, u)
    work = compute_dtype(u.dtype)
    gap = expand_time(_gap(r, t, work), u)
    return (v.to(work) - gap * dudt.to(work)).detach()


def teacher_ode_target(
    teacher: Callable[..., Tensor],
    z_t: Tensor,
    r: Tensor,
    t: Tensor,
    *,
    steps: int = 8,
    method: str = "heun",
    v: Tensor | None = None,
    cond: Mapping[str, Any] | None = None,
) -> Tensor:
    """The teacher's average velocity over ``[r, t]`` by integrating its ODE.

    ``u_tgt = (z_t - z_r) / (t - r)`` with ``z_r`` from ``steps`` fixed steps of
    ``method`` per sample (each sample on its own grid from ``t`` to ``r``); where
    ``r = t`` the limit ``u = v(z_t, t)``. The error is ``O(((t - r) / steps)^order)``.

    Only the samples with ``r < t`` are integrated (gathered, solved, scattered back), and
    their first stage at ``(z_t, t)`` is ``v``: ``1 + K / B (steps * stages - 1)`` teacher
    evaluations per sample for ``K`` of ``B`` samples with ``r < t`` (Heun, 4 steps, a
    quarter of the pairs: 2.75 instead of 9). Counting ``K`` reads the host once
    (:func:`~mfcore.solvers.span_rows`).

    Args:
        teacher: velocity field ``teacher(z, t, **cond)``.
        z_t: states ``(B, ...)`` at time ``t``.
        r, t: ``(B,)`` times with ``r <= t``.
        steps: solver steps per sample.
        method: a solver of :mod:`mfcore.solvers` ("euler", "heun", "midpoint", "rk4").
        v: the teacher's velocity at ``(z_t, t)`` if already computed: the answer where
            ``r = t`` and the first stage of every solve, so it must be the teacher's own
            (omitted: one evaluation per sample computes it).
        cond: conditioning for the teacher; each tensor whose first dimension is the batch is
            taken per sample (a shared one needs another first dimension, e.g. 1).

    Returns:
        the detached target ``(B, ...)`` in the compute dtype of ``z_t`` (fp32 at least, fp64
        stays fp64): the end state is integrated and differenced there, never rounded to a
        half-precision ``z_t`` first (that would cancel the secant of a short interval).

    Example:
        The field ``v = z`` takes ``z_t`` to ``z_r = z_t e^{r - t}``: over ``[0, 1]`` the average
        velocity at ``z_t = 1`` is ``1 - 1/e``; where ``r = t`` it is ``v``.

        >>> import torch
        >>> from mfcore import teacher_ode_target
        >>> z, r, t = torch.ones(2, 1), torch.tensor([0.0, 0.5]), torch.tensor([1.0, 0.5])
        >>> teacher_ode_target(lambda z, t: z, z, r, t, steps=16, method="rk4")
        tensor([[0.6321],
                [1.0000]])
    """
    check_tensor("z_t", z_t, ndim_min=1)
    r, t = check_interval(r, t, z_t)
    check_positive_int("steps", steps)
    step = lookup("method", method, SOLVERS)
    cond = check_cond(cond)
    if v is None:
        with torch.no_grad():
            v = check_like("the output of the teacher", teacher(z_t, t, **cond), z_t)
    else:
        check_like("v", v, z_t, "z_t")
    point = FlowPoint(z_t, r, t, v, cond)
    return _ode_secant(teacher, point, span_rows(r, t), steps=steps, step=step)[0]


def _gap(r: Tensor, t: Tensor, work: torch.dtype) -> Tensor:
    """``t - r`` in ``work``, each time cast first (a half-precision difference would round
    a short interval away)."""
    return t.to(work) - r.to(work)


def _ode_secant(
    teacher, point: FlowPoint, rows: Tensor, *, steps, step, dtype=None, v_is_teacher=True
) -> tuple[Tensor, int]:
    """:func:`teacher_ode_target` on trusted arguments, integrating only the samples ``rows``.

    Args:
        point: ``z_t``, ``r``, ``t``, the conditioning and ``v`` ``(B, ...)``, the velocity at
            ``(z_t, t)``: the answer where ``r = t``; with ``v_is_teacher`` also the first
            stage of the solves. ``v`` None: the teacher is evaluated at ``rows`` only, and
            every other row of the answer is 0 (for a caller that overwrites them).
        rows: ``(K,)`` indices of the samples to integrate (:func:`~mfcore.solvers.span_rows`;
            possibly none); every other sample must have ``r = t``.
        steps, step: the solve: steps and a step function of :data:`~mfcore.solvers.SOLVERS`.
        dtype: the teacher's input dtype (``z_t`` may be held at a higher precision; default
            ``z_t``'s); the answer is in its compute dtype.

    Returns:
        ``(u, the teacher evaluations made)``.
    """
    z_t, r, t, v, cond = point.z, point.r, point.t, point.v, point.cond
    dtype = z_t.dtype if dtype is None else dtype
    work = compute_dtype(dtype)
    n = rows.numel()
    with torch.no_grad():
        if n == 0:  # every r = t: nothing to integrate
            return (torch.zeros_like(z_t, dtype=work) if v is None else v.to(work)), 0
        z = z_t.to(work).index_select(0, rows)
        lo, hi = r.index_select(0, rows), t.index_select(0, rows)
        sub = cond_rows(cond, rows, t.shape[0])
        if v is None:
            x = z.to(dtype)
            v_rows = check_like("the output of the teacher", teacher(x, hi.to(work), **sub), x)
            v_rows, full = v_rows.to(work), torch.zeros_like(z_t, dtype=work)
            evals, start = n, v_rows
        else:
            v_rows, full = v.index_select(0, rows).to(work), v.to(work)
            evals, start = 0, v_rows if v_is_teacher else None
        z_r = solve_span(
            teacher, z, hi, lo, steps=steps, step=step, cond=sub, model_dtype=dtype, v_start=start
        )
        evals += n * (steps * step.stages - (start is not None))
        gap = _gap(lo, hi, work)
        equal = gap == 0
        u = (z - z_r) / expand_time(torch.where(equal, 1.0, gap), z)
        u = torch.where(expand_time(equal, z), v_rows, u)
    return full.index_copy(0, rows, u), evals


#: Who supplies each piece of a split, ``(first [s, t], second [r, s])``: the teacher
#: (``True``) or the stop-gradient student.
_PIECES: Mapping[str, tuple[bool, bool]] = MappingProxyType(
    {"first": (True, False), "both": (True, True), "none": (False, False)}
)


def split_target(
    student: Callable[..., Tensor],
    teacher: Callable[..., Tensor] | None,
    z_t: Tensor,
    r: Tensor,
    t: Tensor,
    s: Tensor,
    v: Tensor,
    *,
    teacher_pieces: str = "first",
    teacher_steps: int = 1,
    method: str = "euler",
    cond: Mapping[str, Any] | None = None,
) -> Tensor:
    """Interval-splitting target (SplitMeanFlow, arXiv 2507.16884, eq. 6).

    For ``r <= s <= t`` the average velocity is additive over sub-intervals:

        (t - r) u(z_t, r, t) = (t - s) u_1 + (s - r) u_2,
        u_1 = u(z_t, s, t),  z_s = z_t - (t - s) u_1,  u_2 = u(z_s, r, s).

    ``teacher_pieces`` picks who supplies ``u_1`` and ``u_2``: ``"first"`` (teacher ODE on
    ``[s, t]``, stop-gradient student on ``[r, s]``), ``"both"`` (teacher on both) or
    ``"none"`` (stop-gradient student on both: pure self-consistency, which needs the
    ``r = t`` pairs' flow-matching signal to be anchored). Where ``r = t`` the target is ``v``.

    The teacher's pieces are integrated at the samples with ``r < t`` only, its solve on
    ``[s, t]`` starting from ``v`` (as :func:`teacher_ode_target`); counting them reads the
    host once.

    Args:
        student: ``u(z, r, t, **cond)``; evaluated without gradient.
        teacher: ``v(z, t, **cond)``; required unless ``teacher_pieces == "none"``.
        z_t: states ``(B, ...)``.
        r, t, s: ``(B,)`` times with ``r <= s <= t``.
        v: velocity at ``(z_t, t)``, ``(B, ...)``; the teacher's own where it has a piece
            (the first stage of its solve on ``[s, t]``).
        teacher_pieces: ``"first"``, ``"both"`` or ``"none"``.
        teacher_steps, method: the teacher's ODE solve on each of its pieces.
        cond: conditioning for both models.

    Returns:
        the detached target ``(B, ...)`` in the compute dtype of ``z_t`` (fp32 at least): the
        split point ``z_s`` stays at that precision, so a teacher piece's secant never
        differences a half-precision state.
    """
    check_tensor("z_t", z_t, ndim_min=1)
    check_interval(s, t, z_t, names=("s", "t"))
    r, s = check_interval(r, s, z_t, names=("r", "s"))
    check_like("v", v, z_t, "z_t")
    pieces = lookup("teacher_pieces", teacher_pieces, _PIECES)
    check_positive_int("teacher_steps", teacher_steps)
    step = lookup("method", method, SOLVERS)
    _need_teacher(pieces, teacher, f"teacher_pieces={teacher_pieces!r}")
    cond = check_cond(cond)
    point = FlowPoint(z_t, r, t, v, cond)
    return _split(student, teacher, point, s, pieces, steps=teacher_steps, step=step)[0]


def _need_teacher(pieces: tuple[bool, bool], teacher: object, who: str) -> None:
    if pieces[0] and teacher is None:
        raise ValueError(f"{who} needs a teacher")


def _split(
    student, teacher, point: FlowPoint, s, pieces, *, steps, step, v_is_teacher=True, one=False
):
    """:func:`split_target` on trusted arguments at ``point`` split at ``s`` (``pieces`` from
    ``_PIECES``, ``step`` a step function): ``(u, the teacher evaluations made)``. The
    teacher integrates its pieces at the samples with ``r < t`` only (one host read, shared
    by both pieces; at least one sample with ``one``); the others' target is ``v``."""
    z_t, r, t, v, cond = point.z, point.r, point.t, point.v, point.cond
    dtype, work = z_t.dtype, compute_dtype(z_t.dtype)
    rows = span_rows(r, t, at_least_one=one) if pieces[0] else None
    evals = 0

    def piece(z, lo, hi, use_teacher, v_hi=None):
        nonlocal evals
        if not use_teacher:
            return student(z.to(dtype), lo, hi, **cond).to(work)
        u, n = _ode_secant(teacher, FlowPoint(z, lo, hi, v_hi, cond), rows, steps=steps,
                           step=step, dtype=dtype, v_is_teacher=v_is_teacher)  # fmt: skip
        evals += n
        return u

    with torch.no_grad():
        u1 = piece(z_t, s, t, pieces[0], v)
        z_s = z_t.to(work) - expand_time(_gap(s, t, work), z_t) * u1
        u2 = piece(z_s, r, s, pieces[1])
        gap = _gap(r, t, work)
        first, second = expand_time(_gap(s, t, work), z_t), expand_time(_gap(r, s, work), z_t)
        u = (first * u1 + second * u2) / expand_time(torch.where(gap == 0, 1.0, gap), z_t)
        u = torch.where(expand_time(gap == 0, z_t), v.to(work), u)
    return u, evals


# --------------------------------------------------------------------------- target objects


class DifferentialTarget:
    """The differential MeanFlow target, ``sg(v - (t - r) du/dt)``, with its prediction.

    Args:
        jvp_method: backend of :func:`mfcore.jvp.total_derivative`.
        fd_step: the finite-difference step for ``"fd"`` (see :func:`~mfcore.jvp.total_derivative`).
        route_sdpa: route ``F.scaled_dot_product_attention`` to :mod:`mfcore.attention` during
            the JVP (models that call torch's SDPA, e.g. diffusers').
        detach_tangents: with ``single_forward``, cut the tangents' reverse-mode history at
            every submodule (:func:`~mfcore.jvp.total_derivative`), so the one forward keeps
            no more activations alive than a plain training forward.
        single_forward: take the prediction from the JVP's own forward (one forward)
            rather than a separate forward after a no-grad JVP (two forwards; the second
            can use gradient checkpointing, which a forward-mode forward cannot).
        clamp: if set, clamp the target elementwise to ``[-clamp, clamp]``.
        tangent_norm: if set to ``c > 0``, replace the tangent term ``T = (t - r) du/dt``
            by ``T / (rms(T) + c)`` per sample (the tangent normalisation of sCM,
            arXiv 2410.11081, Sec. 4.2), which bounds its scale early in training.

    A :class:`~mfcore.fields.Target`: :class:`~mfcore.losses.MeanFlowLoss` calls it with
    checked arguments, which it does not check again.

    Example:
        For ``u(z, r, t) = t z`` along ``v``, ``du/dt = t v + z``, so the target is
        ``v - (t - r) (t v + z)``.

        >>> import torch
        >>> from mfcore import DifferentialTarget, FlowPoint
        >>> target = DifferentialTarget("func")
        >>> target.phase
        'differential'
        >>> z, v = torch.ones(3, 2), torch.full((3, 2), 2.0)
        >>> r, t = torch.zeros(3), torch.full((3,), 0.5)
        >>> out = target(lambda z, r, t: t[:, None] * z, FlowPoint(z, r, t, v))
        >>> out.target[0], out.pred[0]
        (tensor([1., 1.]), tensor([0.5000, 0.5000]))
    """

    phase = "differential"

    def __init__(
        self,
        jvp_method: str = "func",
        *,
        single_forward: bool = True,
        clamp: float | None = None,
        tangent_norm: float | None = None,
        fd_step: float | None = None,
        route_sdpa: bool = False,
        detach_tangents: bool = True,
    ) -> None:
        self._backend = lookup("jvp_method", jvp_method, JVP_BACKENDS)
        for name, value in (("clamp", clamp), ("tangent_norm", tangent_norm), ("fd_step", fd_step)):
            if value is not None:
                check_real(name, value, minimum=0.0, strict=True)
        self.jvp_method = jvp_method
        self.single_forward = single_forward
        self.clamp = clamp
        self.tangent_norm = tangent_norm
        self.fd_step = fd_step
        self.route_sdpa = route_sdpa
        self.detach_tangents = bool(detach_tangents)

    def __call__(
        self, student, point: FlowPoint, *, teacher=None, generator=None, step=None
    ) -> TargetOutput:
        rng = None if self.single_forward else rng_state(point.z.device)
        u, dudt = self._jvp(student, point, keep_graph=self.single_forward)
        pred = u if self.single_forward else _same_draws_forward(student, point, rng)
        metrics = {"dudt_rms": dudt.detach().float().pow(2).mean().sqrt()}
        return TargetOutput(pred, self._target(point, dudt), metrics)

    def compute(self, student, point: FlowPoint, *, teacher=None, generator=None) -> Tensor:
        """The detached target alone, from one JVP that keeps no graph (e.g. to compare it
        with a discrete target on the same batch)."""
        _, dudt = self._jvp(student, point, keep_graph=False)
        return self._target(point, dudt)

    def _jvp(self, student, point: FlowPoint, *, keep_graph: bool) -> tuple[Tensor, Tensor]:
        options = JvpOptions(keep_graph, self.fd_step, self.route_sdpa, self.detach_tangents)
        return along_flow(self._backend, student, point, options)

    def _target(self, point: FlowPoint, dudt: Tensor) -> Tensor:
        """``v - (t - r) du/dt`` with the optional tangent normalisation and clamp."""
        z_t, r, t, v = point.z, point.r, point.t, point.v
        work = compute_dtype(z_t.dtype)
        tangent = expand_time(_gap(r, t, work), z_t) * dudt.to(work)
        if self.tangent_norm is not None:
            rms = tangent.flatten(1).pow(2).mean(1).sqrt()
            tangent = tangent / expand_time(rms + self.tangent_norm, z_t)
        target = (v.to(work) - tangent).detach()
        if self.clamp is not None:
            target = target.clamp(-self.clamp, self.clamp)
        return target

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state


def _same_draws_forward(student, point: FlowPoint, state: Tensor) -> Tensor:
    """``student(z_t, r, t)`` drawing the same random numbers (dropout masks) as the forward
    that started from RNG ``state``: the graph forward then differentiates the function
    whose ``du/dt`` made the target. The RNG ends where that second forward leaves it."""
    restore_rng(state, point.z.device)
    return student(point.z, point.r, point.t, **point.cond)


class _DiscreteTarget(ABC):
    """Shared shell of the discrete targets (:class:`~mfcore.fields.DiscreteTarget`): the
    prediction is a plain forward. :class:`~mfcore.losses.MeanFlowLoss` calls it with
    checked arguments, which it does not check again; the student's output is checked."""

    phase = "discrete"

    @abstractmethod
    def _compute(self, student, point: FlowPoint, teacher, generator) -> tuple[Tensor, int]:
        """The detached target ``(B, ...)`` at ``point`` and the teacher evaluations it made."""

    def compute(self, student, point: FlowPoint, *, teacher=None, generator=None) -> Tensor:
        """The detached target ``(B, ...)`` (no student prediction)."""
        return self._compute(student, point, teacher, generator)[0]

    def __call__(
        self, student, point: FlowPoint, *, teacher=None, generator=None, step=None
    ) -> TargetOutput:
        """The prediction, the target and the metric ``teacher_evals_per_sample``: the
        teacher's evaluations per sample for this target, counting the loss's ``v`` at
        ``(z_t, t)`` as one when there is a teacher (a host number: no sync)."""
        target, evals = self._compute(student, point, teacher, generator)
        z_t = point.z
        u = student(z_t, point.r, point.t, **point.cond)
        pred = check_like("the student's output", u, z_t)
        per_sample = (teacher is not None) + evals / z_t.shape[0]
        metrics = {"teacher_evals_per_sample": torch.full((), float(per_sample), device=z_t.device)}
        return TargetOutput(pred, target, metrics)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state


class TeacherODETarget(_DiscreteTarget):
    """The teacher's ODE secant over ``[r, t]`` (see :func:`teacher_ode_target`).

    Args:
        steps: solver steps per sample.
        method: solver name of :mod:`mfcore.solvers`.
        reuse_v: take the solves' first stage at ``(z_t, t)`` from ``v`` (one teacher
            evaluation fewer per integrated sample). Right when ``v`` is the teacher's own
            velocity, as :class:`~mfcore.losses.MeanFlowLoss` passes it without guidance;
            with a guidance that changes ``v`` (:class:`~mfcore.guidance.MeanFlowGuidance`)
            pass ``False`` to integrate the teacher alone.
        always_call: call the teacher the same number of times at every batch, integrating
            one sample (an empty span) when no pair has ``r < t``. A teacher sharded over
            ranks needs it (FSDP2 gathers a block's weights at each call, on every rank
            together; ``mfcore-distill --parallel fsdp`` sets it); otherwise a batch of
            ``r = t`` pairs calls no teacher.

    Only the pairs with ``r < t`` are integrated (see :func:`teacher_ode_target`); a call
    reports ``teacher_evals_per_sample`` in its metrics (``1 + (steps * stages - 1) K / B``
    with ``K`` of the ``B`` pairs integrated: 2.75 for Heun, 4 steps, a quarter of the pairs).
    ``K`` is the shape of the solve, so a call reads the host once to count the pairs
    (:func:`~mfcore.solvers.span_rows`; :mod:`mfcore.time`'s samplers draw the ``r = t`` mask
    on the device, so the host cannot know it beforehand): one sync for 3.3x fewer teacher
    evaluations at mfcore-distill's defaults.

    Example:
        >>> import torch
        >>> from mfcore import FlowPoint, TeacherODETarget
        >>> target = TeacherODETarget(steps=16, method="rk4")
        >>> target.phase
        'discrete'
        >>> z, r, t = torch.ones(2, 1), torch.tensor([0.0, 0.5]), torch.tensor([1.0, 0.5])
        >>> target.compute(None, FlowPoint(z, r, t, z), teacher=lambda z, t: z)
        tensor([[0.6321],
                [1.0000]])
    """

    def __init__(
        self,
        steps: int = 8,
        method: str = "heun",
        *,
        reuse_v: bool = True,
        always_call: bool = False,
    ) -> None:
        self.steps = check_positive_int("steps", steps)
        self._step = lookup("method", method, SOLVERS)
        self.method = method
        self.reuse_v, self.always_call = bool(reuse_v), bool(always_call)

    def _compute(self, student, point: FlowPoint, teacher, generator) -> tuple[Tensor, int]:
        if teacher is None:
            raise ValueError("TeacherODETarget needs a teacher (pass teacher=...)")
        rows = span_rows(point.r, point.t, at_least_one=self.always_call)
        return _ode_secant(
            teacher, point, rows, steps=self.steps, step=self._step, v_is_teacher=self.reuse_v
        )


class SplitTarget(_DiscreteTarget):
    """Interval-splitting target at ``s = r + lambda (t - r)``, ``lambda ~ U(0, 1)`` per sample.

    Args:
        teacher_pieces: ``"first"``, ``"both"`` or ``"none"`` (see :func:`split_target`).
        teacher_steps: the teacher's solver steps on each piece it covers.
        method: solver name.
        reuse_v: as :class:`TeacherODETarget`'s, for the teacher's piece ``[s, t]``.
        always_call: as :class:`TeacherODETarget`'s.

    A call reports ``teacher_evals_per_sample`` in its metrics.
    """

    def __init__(
        self,
        teacher_pieces: str = "first",
        teacher_steps: int = 1,
        method: str = "euler",
        *,
        reuse_v: bool = True,
        always_call: bool = False,
    ) -> None:
        self._pieces = lookup("teacher_pieces", teacher_pieces, _PIECES)
        self.teacher_steps = check_positive_int("teacher_steps", teacher_steps)
        self._step = lookup("method", method, SOLVERS)
        self.teacher_pieces, self.method = teacher_pieces, method
        self.reuse_v, self.always_call = bool(reuse_v), bool(always_call)

    def split_point(self, r: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
        """The split times ``s`` ``(B,)`` in ``[r, t]``: here ``r + lambda (t - r)``,
        ``lambda ~ U(0, 1)`` per sample (a subclass may choose its own)."""
        lam = torch.rand(t.shape, generator=generator, device=t.device, dtype=t.dtype)
        return torch.minimum(r + lam * (t - r), t)

    def _compute(self, student, point: FlowPoint, teacher, generator) -> tuple[Tensor, int]:
        _need_teacher(self._pieces, teacher, f"{type(self).__name__}({self.teacher_pieces!r})")
        s = self.split_point(point.r, point.t, generator)
        return _split(
            student, teacher, point, s, self._pieces, steps=self.teacher_steps, step=self._step,
            v_is_teacher=self.reuse_v, one=self.always_call,
        )  # fmt: skip
