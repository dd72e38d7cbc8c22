"""Curricula: a discrete target that moves from the teacher's flow towards MeanFlow's identity.

The interval-splitting identity (SplitMeanFlow, arXiv 2507.16884, eq. 6) with the teacher's
Euler step on a first piece ``[s, t]`` and the stop-gradient student on ``[r, s]``,

    u_tgt = ((t - s) v + (s - r) u(z_s, r, s)) / (t - r),   z_s = z_t - (t - s) v,

costs one teacher evaluation per sample (``v``, which the loss has already) and one student
forward, no JVP. How long the teacher's piece is decides what it teaches:

- ``s = r`` (the whole interval): ``u_tgt = v``, trajectory flow matching;
- ``t - s -> 0``: the secant of ``u`` along the flow, whose limit is the differential
  MeanFlow target ``v - (t - r) du/dt`` (Geng et al., arXiv 2505.13447, eq. 10).

:class:`SplitCurriculumTarget` shrinks the teacher's piece on a schedule, so training starts
on flow matching and ends near MeanFlow's target (then a
:class:`~mfcore.warmup.WarmupTarget` can hand over to the differential target itself):

- ``relative=True``: ``t - s = a (t - r)`` with ``a`` from :class:`LinearSpan`, the anneal
  of alpha-Flow (Zhang et al., arXiv 2510.20771), which moves from trajectory flow matching
  (``a = 1``) to MeanFlow (``a -> 0``); the paper's ramp is smooth, ours linear;
- ``relative=False``: ``t - s = min(t - r, a)``, an absolute step that :class:`HalvingSpan`
  halves in stages: our reading of the Discrete MeanFlow curriculum (Hsu and Wood, arXiv
  2604.08837), a consistency-style discretisation of MeanFlow's identity refined in stages
  and started from a flow model. Its paper's code was not available to us: this is the
  abstract's recipe, not a reproduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mfcore._checks import check_callable, check_positive_int, check_real
from mfcore.targets import SplitTarget

__all__ = ["LinearSpan", "HalvingSpan", "SplitCurriculumTarget"]


@dataclass(frozen=True)
class LinearSpan:
    """``a(step)``: ``start`` at step 0, linear to ``end`` at ``steps``, then ``end``.

    Example:
        >>> span = LinearSpan(1.0, 0.1, steps=10)
        >>> span(0), span(5), span(99)
        (1.0, 0.55, 0.1)
    """

    start: float = 1.0
    end: float = 0.05
    steps: int = 1000

    def __post_init__(self) -> None:
        check_real("start", self.start, minimum=0.0, strict=True)
        check_real("end", self.end, minimum=0.0, strict=True)
        check_positive_int("steps", self.steps)

    def __call__(self, step: int) -> float:
        frac = max(step, 0) / self.steps
        return self.end if frac >= 1.0 else self.start + (self.end - self.start) * frac


@dataclass(frozen=True)
class HalvingSpan:
    """``a(step)``: ``start``, halved at each of ``stages - 1`` equal stages over ``steps``.

    Example:
        >>> span = HalvingSpan(1.0, stages=3, steps=30)
        >>> span(0), span(10), span(29), span(99)
        (1.0, 0.5, 0.25, 0.25)
    """

    start: float = 1.0
    stages: int = 5
    steps: int = 1000

    def __post_init__(self) -> None:
        check_real("start", self.start, minimum=0.0, strict=True)
        check_positive_int("stages", self.stages)
        check_positive_int("steps", self.steps)

    def __call__(self, step: int) -> float:
        stage = min(math.floor(max(step, 0) * self.stages / self.steps), self.stages - 1)
        return self.start / 2**stage


class SplitCurriculumTarget(SplitTarget):
    """The split target with the teacher's piece ``[s, t]`` shrinking on a schedule.

    Args:
        span: ``a(step) -> float`` (:class:`LinearSpan`, :class:`HalvingSpan` or any callable):
            the teacher's share ``a`` of the interval (``relative``), in ``(0, 1]``, or its
            length, ``> 0``.
        relative: ``t - s = a (t - r)`` (alpha-Flow) or ``t - s = min(t - r, a)``.
        teacher_steps, method: the teacher's solve on its piece (one Euler step: no teacher
            evaluation beyond ``v``).
        reuse_v, always_call: as :class:`~mfcore.targets.TeacherODETarget`'s.

    The step is the one the loss passes to ``__call__`` (a
    :class:`~mfcore.warmup.WarmupTarget` passes its own); :meth:`compute` uses the last one
    seen. Where ``r = t`` the target is ``v``. Shapes: ``z_t`` ``(B, ...)``, ``r, t`` ``(B,)``.

    Example:
        >>> import torch
        >>> from mfcore import FlowPoint
        >>> target = SplitCurriculumTarget(LinearSpan(1.0, 0.1, steps=100))
        >>> z, r, t = torch.ones(2, 1), torch.tensor([0.0, 0.5]), torch.tensor([1.0, 0.5])
        >>> v = -z
        >>> point = FlowPoint(z, r, t, v)
        >>> target.compute(lambda z, r, t: 0 * z, point, teacher=lambda z, t: -z)  # a = 1: v
        tensor([[-1.],
                [-1.]])
    """

    def __init__(
        self,
        span,
        *,
        relative: bool = True,
        teacher_steps: int = 1,
        method: str = "euler",
        reuse_v: bool = True,
        always_call: bool = False,
    ) -> None:
        check_callable("span", span)
        super().__init__("first", teacher_steps, method, reuse_v=reuse_v, always_call=always_call)
        self.span, self.relative = span, bool(relative)
        self.step = 0

    def span_at(self, step: int) -> float:
        """The checked ``a`` at ``step``: in ``(0, 1]`` when relative, ``> 0`` otherwise."""
        a = check_real("span(step)", self.span(step), minimum=0.0, strict=True)
        if self.relative and a > 1.0:
            raise ValueError(f"a relative span must lie in (0, 1], got {a} at step {step}")
        return float(a)

    def __call__(self, student, point, *, teacher=None, generator=None, step=None):
        if step is not None:
            self.step = check_positive_int("step", step, minimum=0)
        return super().__call__(student, point, teacher=teacher, generator=generator)

    def split_point(self, r: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
        """``s = t - a (t - r)`` or ``t - min(t - r, a)`` at the current step's ``a``."""
        a = self.span_at(self.step)
        gap = t - r
        s = t - a * gap if self.relative else t - gap.clamp(max=a)
        return s.clamp(min=r, max=t)  # rounding must not step outside [r, t]

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state.get("step", 0))
