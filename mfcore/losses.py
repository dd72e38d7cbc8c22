"""The losses users import: MeanFlowLoss, FlowMatchingLoss, and their weightings.

Per-sample losses are squared L2 norms summed over the non-batch dimensions (as in
MeanFlow, arXiv 2505.13447, Sec. 4.3), multiplied by a detached per-sample weight, and
averaged over the batch. Each loss returns ``(loss, metrics)``: the scalar to
backpropagate and a dict of detached 0-dim tensors for logging.

A non-finite loss raises :class:`FloatingPointError` naming how many samples went bad and
the first input or intermediate that was not finite (looked for only then);
it is never averaged away.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from mfcore._checks import (
    check_batch,
    check_callable,
    check_generator,
    check_instance,
    check_interval,
    check_like,
    check_positive_int,
    check_real,
    check_tensor,
    check_time,
    check_weighting,
    check_weights,
    non_finite_loss,
)
from mfcore.fields import Target, Weighting
from mfcore.guidance import MeanFlowGuidance
from mfcore.path import FlowPoint, compute_dtype, sample_path
from mfcore.targets import DifferentialTarget
from mfcore.time import LogitNormalTime, TimePairSampler, draw_from, valid_by_construction

__all__ = [
    "AdaptiveWeight",
    "sample_path",
    "per_sample_sq_error",
    "MeanFlowLoss",
    "FlowMatchingLoss",
]


class AdaptiveWeight:
    """MeanFlow's adaptive weight ``w = sg(1 / (||delta||^2 + c)^p)`` (arXiv 2505.13447, eq. 22).

    With ``p = 0`` it is plain L2; ``p = 1`` makes the loss roughly scale-free
    (``||delta||^2 / (||delta||^2 + c)``); ``p = 0.5`` a pseudo-Huber loss.

    Args:
        p: the power, ``>= 0``.
        c: the offset, ``> 0``.

    A :class:`~mfcore.fields.Weighting`: called as ``weight(sq_err, r, t) -> (B,)`` with
    ``sq_err`` the per-sample squared norm.

    Example:
        >>> import torch
        >>> from mfcore import AdaptiveWeight
        >>> w = AdaptiveWeight(p=1.0, c=1.0)
        >>> w(torch.tensor([0.0, 1.0, 3.0]), torch.zeros(3), torch.ones(3))
        tensor([1.0000, 0.5000, 0.2500])
    """

    def __init__(self, p: float = 1.0, c: float = 1e-3) -> None:
        self.p = check_real("p", p, minimum=0.0)
        self.c = check_real("c", c, minimum=0.0, strict=True)

    def __call__(self, sq_err: Tensor, r: Tensor, t: Tensor) -> Tensor:
        del r, t
        return (sq_err.detach() + self.c).pow(-self.p)

    def __repr__(self) -> str:
        return f"AdaptiveWeight(p={self.p}, c={self.c})"


def _weigh(weighting: Weighting | None, sq_err: Tensor, r: Tensor, t: Tensor) -> Tensor:
    """``weighting(sq_err, r, t)``, ``(B,)`` and checked (a shape comparison, no sync); ones
    without a weighting."""
    if weighting is None:
        return torch.ones_like(sq_err)
    return check_weights(weighting(sq_err, r, t), sq_err)


def per_sample_sq_error(pred: Tensor, target: Tensor) -> Tensor:
    """``||pred - target||^2`` summed over all but the batch dimension (fp32 at least).

    Args:
        pred, target: floating tensors ``(B, ...)`` of the same shape and device.

    Returns:
        ``(B,)`` in the compute dtype of ``pred`` (fp32 at least, fp64 stays fp64).
    """
    check_batch("pred", pred)
    check_like("target", target, pred, "pred")
    return _sq_error(pred, target)


def _sq_error(pred: Tensor, target: Tensor) -> Tensor:
    """:func:`per_sample_sq_error` on trusted arguments."""
    work = compute_dtype(pred.dtype)
    return (pred.to(work) - target.to(work)).pow(2).flatten(1).sum(1)


def _prepare(x, noise, generator, validate: bool):
    if validate:
        check_batch("x", x)
        check_generator(generator, x.device)
    if noise is None:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return check_like("noise", noise, x, "x") if validate else noise


def _draw(sampler, x: Tensor, generator, *, trusted: bool, check, what: str):
    """A sampler's draw for the batch ``x``; unless ``trusted`` (one of :mod:`mfcore.time`'s
    samplers, valid by construction), ``check(draw, x)`` at once (one sync), naming the
    sampler, before any model runs, rather than deep in a target."""
    kw = {"device": x.device, "dtype": compute_dtype(x.dtype), "generator": generator}
    if trusted:
        return draw_from(sampler, x.shape[0], **kw)
    draw = sampler(x.shape[0], **kw)
    try:
        return check(draw, x)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{what} returned invalid times: {err}") from None


def _pair(draw: object, x: Tensor) -> tuple[Tensor, Tensor]:
    if not (isinstance(draw, tuple | list) and len(draw) == 2):
        raise TypeError(f"a pair (r, t) was expected, got {type(draw).__name__}")
    return check_interval(draw[0], draw[1], x)


def _times(draw: object, x: Tensor) -> Tensor:
    return check_time("t", draw, x)


def _reduce(
    sq_err: Tensor, weight: Tensor, suspects: Callable[[], list], step: int | None = None
) -> Tensor:
    """The weighted mean; a non-finite loss raises (one sync), naming the first of
    ``suspects()`` (looked at only then) that is not finite."""
    per_sample = weight * sq_err
    if not bool(torch.isfinite(per_sample).all()):
        raise non_finite_loss(per_sample, suspects(), step)
    return per_sample.mean()


def _path_velocity(teacher, z_t: Tensor, t: Tensor, cond: dict, *, x: Tensor, noise: Tensor):
    """The velocity at ``(z_t, t)``: the teacher's, or the path's own ``eps - x`` without one."""
    if teacher is None:
        return noise - x
    with torch.no_grad():
        v = teacher(z_t, t, **cond)
    check_like("teacher output", v, z_t, "z_t")
    return v


class MeanFlowLoss:
    """MeanFlow loss composing a time-pair sampler, a target and a weighting.

    Draws ``(r, t)`` and noise, forms ``z_t = (1 - t) x + t eps``, takes the velocity ``v``
    at ``(z_t, t)`` from the teacher (distillation) or as ``eps - x`` (training from data,
    as the original MeanFlow), asks the target for ``(pred, u_tgt)`` and returns
    ``mean_B w * ||pred - u_tgt||^2`` (arXiv 2505.13447, eqs. 10 and 22). With every pair
    at ``r = t`` the differential target is ``v`` and the loss is flow matching.

    Args:
        time_sampler: returns ``(r, t)`` for a batch size (default MeanFlow's:
            logit-normal(-0.4, 1.0), 25% of pairs with ``r != t``). The draws of
            :mod:`mfcore.time`'s samplers are valid by construction
            (:func:`~mfcore.time.valid_by_construction`) and not checked; any other
            sampler's draw is checked at every call, before any model runs (one sync).
        target: a :class:`~mfcore.fields.Target` (default the differential one with
            ``torch.func.jvp``); a :class:`~mfcore.warmup.WarmupTarget` gives the warm-up.
        weighting: a :class:`~mfcore.fields.Weighting` ``weighting(sq_err, r, t) -> (B,)``
            of detached weights (default :class:`AdaptiveWeight` ``(p=1, c=1e-3)``;
            ``AdaptiveWeight(p=0)`` is plain L2).
        guidance: a :class:`~mfcore.guidance.MeanFlowGuidance`: guided training (eq. 21)
            inside its window of ``t``, with label dropout (the dropped samples train on
            the null condition and the unguided ``v``; with a teacher, the teacher's ``v``
            on the null condition). A plain callable ``guidance(v, student, z_t, t, cond)
            -> v`` is applied to every sample, as before (it warns once, when built).

    Call: ``loss, metrics = mf(student, x, teacher=None, noise=None, cond=None, r=None,
    t=None, cond_drop=None, step=None, generator=None, validate=True)`` with ``x`` of shape
    ``(B, ...)``; ``r`` and ``t`` ``(B,)`` (``r <= t``) fix the times instead of the
    sampler; ``cond_drop`` ``(B,)`` bool fixes which conditions are dropped (with a
    ``MeanFlowGuidance``) instead of drawing them from ``generator``. ``validate=False``
    trusts ``x``, ``noise``, the fixed times and ``step`` (a caller that checked or drew
    them itself, as mfcore-distill's step draws its times with a sampler of
    :mod:`mfcore.time`): fixed times are then not checked (one sync fewer).

    A call checks its inputs once and then trusts them: the default path (a sampler of
    :mod:`mfcore.time`, the differential target) reads the host once, to check that the
    loss is finite; a discrete target of :mod:`mfcore.targets` with a teacher reads it once
    more, to count the pairs ``r < t`` its teacher integrates.

    Example:
        >>> import torch
        >>> from mfcore import MeanFlowLoss, TeacherODETarget
        >>> student = lambda z, r, t: torch.zeros_like(z)
        >>> teacher = lambda z, t: -z
        >>> loss_fn = MeanFlowLoss(target=TeacherODETarget(steps=2))
        >>> gen = torch.Generator().manual_seed(0)
        >>> loss, metrics = loss_fn(student, torch.randn(8, 2), teacher=teacher, generator=gen)
        >>> loss.shape, sorted(metrics)[:3]
        (torch.Size([]), ['frac_r_neq_t', 'loss', 'mse'])
    """

    def __init__(
        self,
        time_sampler: Callable[..., tuple[Tensor, Tensor]] | None = None,
        target: Any = None,
        weighting: Weighting | None = None,
        *,
        guidance: MeanFlowGuidance | Callable[..., Tensor] | None = None,
    ) -> None:
        check_callable("time_sampler", time_sampler, optional=True)
        self.time_sampler = time_sampler if time_sampler is not None else TimePairSampler()
        self._trusted = valid_by_construction(self.time_sampler)
        what = "a mfcore.fields.Target (phase, __call__, state_dict, load_state_dict)"
        check_instance("target", target, Target, what, optional=True)
        self.target = target if target is not None else DifferentialTarget()
        weighting = check_weighting(weighting)
        self.weighting = weighting if weighting is not None else AdaptiveWeight()
        check_callable("guidance", guidance, optional=True)
        if guidance is not None and not isinstance(guidance, MeanFlowGuidance):
            warnings.warn(
                "a plain guidance callable is applied to every sample, as guidance(v, student, "
                "z_t, t, cond), with no time window or label dropout; MeanFlowGuidance "
                "guides as the MeanFlow reference does",
                UserWarning,
                stacklevel=2,
            )
        self.guidance = guidance
        if guidance is not None:
            for part in (self.target, getattr(self.target, "discrete_target", None)):
                if getattr(part, "reuse_v", False):
                    raise ValueError(
                        f"with guidance, the target's {type(part).__name__} must take "
                        "reuse_v=False: the loss's v is the guided velocity, not the teacher's "
                        "own, so a solve must not start from it"
                    )

    def __call__(
        self,
        student: Callable[..., Tensor],
        x: Tensor,
        *,
        teacher: Callable[..., Tensor] | None = None,
        noise: Tensor | None = None,
        cond: Mapping[str, Any] | None = None,
        r: Tensor | None = None,
        t: Tensor | None = None,
        cond_drop: Tensor | None = None,
        step: int | None = None,
        generator: torch.Generator | None = None,
        validate: bool = True,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        noise = _prepare(x, noise, generator, validate)
        if step is not None and validate:
            check_positive_int("step", step, minimum=0)
        cond = dict(cond or {})
        if r is None and t is None:
            r, t = _draw(
                self.time_sampler, x, generator, trusted=self._trusted, check=_pair,
                what="time_sampler",
            )  # fmt: skip
        elif r is None or t is None:
            raise ValueError("pass r and t together (fixed times), or neither (sampled times)")
        elif validate:
            r, t = check_interval(r, t, x)
        drop = self._drop(cond_drop, x, generator)
        z_t = sample_path(x, noise, t, validate=False)
        v0, v, student_cond, extra = self._guided(
            student, teacher, z_t, t, cond, drop, path=(x, noise)
        )
        point = FlowPoint(z_t, r, t, v, student_cond)
        out = self.target(student, point, teacher=teacher, generator=generator, step=step)
        sq_err = _sq_error(out.pred, out.target)
        weight = _weigh(self.weighting, sq_err, r, t)

        def suspects() -> list:
            return [
                ("the batch's data x", x),
                ("the noise", noise),
                ("the student's weights", student),
                ("the teacher's output v" if teacher is not None else "v = noise - x", v0),
                (f"the guided velocity (guidance {self.guidance!r})", v),
                ("the student's output u", out.pred),
                (f"the target ({type(self.target).__name__})", out.target),
                (f"the weighting's output ({self.weighting!r})", weight),
            ]

        loss = _reduce(sq_err, weight, suspects, step)
        metrics = {
            "loss": loss.detach(),
            "mse": (sq_err.detach() / out.pred[0].numel()).mean(),
            "target_rms": out.target.detach().float().pow(2).mean().sqrt(),
            "weight_mean": weight.detach().mean(),
            "frac_r_neq_t": (r != t).float().mean(),
            **extra,
            **out.metrics,
        }
        return loss, metrics

    def _drop(self, cond_drop: object, x: Tensor, generator) -> Tensor | None:
        """The ``(B,)`` mask of dropped conditions: given (checked), drawn, or ``None``."""
        if not isinstance(self.guidance, MeanFlowGuidance):
            if cond_drop is not None:
                raise ValueError("cond_drop needs guidance=MeanFlowGuidance(...)")
            return None
        if cond_drop is None:
            return self.guidance.draw_drop(x.shape[0], device=x.device, generator=generator)
        check_tensor("cond_drop", cond_drop, floating=False)
        assert isinstance(cond_drop, Tensor)
        if cond_drop.dtype != torch.bool:
            raise TypeError(f"cond_drop must be a bool tensor, got {cond_drop.dtype}")
        if cond_drop.shape != x.shape[:1] or cond_drop.device != x.device:
            raise ValueError(
                f"cond_drop must have shape ({x.shape[0]},) on {x.device}, "
                f"got {tuple(cond_drop.shape)} on {cond_drop.device}"
            )
        return cond_drop

    def _guided(self, student, teacher, z_t, t, cond, drop, *, path):
        """``(v, guided v, the student's cond, metrics)``: ``v`` guided where the guidance
        says, the dropped rows of ``cond`` (and of the teacher's) set to the null condition;
        ``path`` is ``(x, noise)`` (the velocity without a teacher)."""
        x, noise = path
        if self.guidance is None:
            v = _path_velocity(teacher, z_t, t, cond, x=x, noise=noise)
            return v, v, cond, {}
        if not isinstance(self.guidance, MeanFlowGuidance):
            v = _path_velocity(teacher, z_t, t, cond, x=x, noise=noise)
            with torch.no_grad():
                return v, self.guidance(v, student, z_t, t, cond), cond, {}
        student_cond = self.guidance.condition(cond, drop)
        v = _path_velocity(teacher, z_t, t, student_cond, x=x, noise=noise)
        guided = self.guidance(v, student, z_t, t, cond, drop=drop)
        dropped = drop.float().mean() if drop is not None else torch.zeros((), device=t.device)
        metrics = {"frac_guided": self.guidance.guided(t, drop).float().mean()}
        return v, guided, student_cond, {**metrics, "frac_dropped": dropped}

    def state_dict(self) -> dict:
        """The target's state (the warm-up phase lives there)."""
        return {"target": self.target.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.target.load_state_dict(state["target"])


class FlowMatchingLoss:
    """Flow matching for a velocity network ``model(z, t, **cond)`` (arXiv 2210.02747).

    Regresses ``model(z_t, t)`` onto the teacher's velocity (distillation, or a critic's
    own training on teacher/student samples) or onto ``eps - x`` (training from data).

    Args:
        time_sampler: ``sampler(B, device=, dtype=, generator=) -> (B,)`` (default
            logit-normal(0, 1), SD3 arXiv 2403.03206); checked as in :class:`MeanFlowLoss`.
        weighting: a :class:`~mfcore.fields.Weighting`, called ``weighting(sq_err, t, t)``,
            or ``None`` (L2).

    Example:
        >>> import torch
        >>> from mfcore import FlowMatchingLoss
        >>> teacher = lambda z, t: -z
        >>> loss, metrics = FlowMatchingLoss()(teacher, torch.randn(8, 2), teacher=teacher)
        >>> loss.item(), sorted(metrics)  # a model equal to its teacher: zero loss
        (0.0, ['loss', 'mse'])
    """

    def __init__(
        self, time_sampler: Callable[..., Tensor] | None = None, weighting: Weighting | None = None
    ) -> None:
        check_callable("time_sampler", time_sampler, optional=True)
        self.time_sampler = time_sampler if time_sampler is not None else LogitNormalTime()
        self._trusted = valid_by_construction(self.time_sampler)
        self.weighting = check_weighting(weighting)

    def __call__(
        self,
        model: Callable[..., Tensor],
        x: Tensor,
        *,
        teacher: Callable[..., Tensor] | None = None,
        noise: Tensor | None = None,
        cond: Mapping[str, Any] | None = None,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss on clean samples ``x`` ``(B, ...)``; ``t`` ``(B,)`` overrides the sampler."""
        noise = _prepare(x, noise, generator, True)
        cond = dict(cond or {})
        if t is None:
            t = _draw(self.time_sampler, x, generator, trusted=self._trusted, check=_times,
                      what="the time sampler")  # fmt: skip
        else:
            check_time("t", t, x)
        z_t = sample_path(x, noise, t, validate=False)
        target = _path_velocity(teacher, z_t, t, cond, x=x, noise=noise)
        pred = model(z_t, t, **cond)
        check_like("model output", pred, z_t, "z_t")
        sq_err = _sq_error(pred, target)
        weight = _weigh(self.weighting, sq_err, t, t)

        def suspects() -> list:
            return [
                ("the batch's data x", x),
                ("the noise", noise),
                ("the model's weights", model),
                ("the teacher's output v" if teacher is not None else "v = noise - x", target),
                ("the model's output", pred),
                (f"the weighting's output ({self.weighting!r})", weight),
            ]

        loss = _reduce(sq_err, weight, suspects)
        return loss, {"loss": loss.detach(), "mse": (sq_err.detach() / pred[0].numel()).mean()}
