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

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from mfcore._checks import (
    check_callable,
    check_cond,
    check_finite,
    check_fraction,
    check_grid,
    check_grid_steps,
    check_instance,
    check_interval,
    check_positive_int,
    check_real,
    check_shape,
    check_tensor,
    check_time,
    check_values_finite,
    check_weighting,
    check_weights,
    compute_dtype,
    expand_time,
)
from mfcore.fields import VelocityField, Weighting
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

logger = logging.getLogger(__name__)

MAX_RATE = 50.0
"""Largest rate ``g_k`` the closed form accepts (see the module docstring)."""

# Below this |x|, (e^x - 1) / x is evaluated by its Taylor series (error < x^6 / 5040,
# under 1e-15 at the threshold) so the value and its gradient stay exact near x = 0.
_SERIES_THRESHOLD = 1e-2


@dataclasses.dataclass(frozen=True)
class ArcParams:
    """The momentum mixture a student predicts at the source time of one step.

    Attributes:
        m: velocity components ``(B, K, *Z)``.
        weights: mixture weights ``pi_k`` of shape ``(B, K, *S)`` (each size of ``S`` is 1
            or that of ``Z``). The head makes them a softmax over ``k``; the closed form
            accepts any finite values.
        rates: rates ``g_k`` of shape ``(B, K, *S)``, in ``[0, MAX_RATE]``.
        s0: source times ``(B,)`` in ``[0, 1]`` at which ``v(s0) = sum_k pi_k m_k``.

    Raises:
        TypeError: a field is not a floating tensor.
        ValueError: the shapes disagree, a value is not finite, or a rate is out of range.
    """

    m: Tensor
    weights: Tensor
    rates: Tensor
    s0: Tensor

    def __post_init__(self) -> None:
        check_tensor("m", self.m, ndim_min=2)
        check_time("s0", self.s0, batch=self.m.shape[0])
        for name in ("weights", "rates"):
            _check_mixture_field(name, getattr(self, name), self.m)
        for name in ("m", "weights", "rates"):
            check_values_finite(f"ArcParams.{name}", getattr(self, name))
        if self.s0.device != self.m.device:
            raise ValueError(f"s0 is on {self.s0.device} but m is on {self.m.device}")
        _check_rate_range(self.rates)

    @property
    def num_components(self) -> int:
        """The number ``K`` of momentum components."""
        return self.m.shape[1]

    def detach(self) -> ArcParams:
        """A copy with every tensor detached from the autograd graph."""
        return ArcParams(self.m.detach(), self.weights.detach(), self.rates.detach(), self.s0)


@runtime_checkable
class ArcFlowStudent(Protocol):
    """A student ``f(z, s0, **cond) -> ArcParams`` evaluated at the start of a step.

    Args:
        z: state ``(B, *Z)`` at the source times.
        s0: source times ``(B,)`` in ``[0, 1]``.
        **cond: conditioning passed through unchanged.

    Returns:
        the :class:`ArcParams` of the step starting at ``s0`` (with ``m`` of shape
        ``(B, K, *Z)`` and the same ``s0``).
    """

    def __call__(self, z: Tensor, s0: Tensor, **cond: Any) -> ArcParams: ...


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------


def _check_mixture_field(name: str, x: object, m: Tensor) -> None:
    """``x`` must be ``(B, K, *S)`` with ``S`` broadcasting to ``m.shape[2:]`` explicitly."""
    check_tensor(name, x)
    assert isinstance(x, Tensor)
    if x.device != m.device:
        raise ValueError(f"{name} is on {x.device} but m is on {m.device}")
    ok = x.ndim == m.ndim and x.shape[:2] == m.shape[:2]
    ok = ok and all(a in (1, b) for a, b in zip(x.shape[2:], m.shape[2:], strict=True))
    if not ok:
        raise ValueError(
            f"{name} must have shape (B, K, *S) = ({m.shape[0]}, {m.shape[1]}, ...) with each "
            f"size of S equal to 1 or to that of m {tuple(m.shape[2:])}; got {tuple(x.shape)}"
        )


def _check_rate_range(rates: Tensor) -> None:
    if bool(((rates < 0) | (rates > MAX_RATE)).any()):
        raise ValueError(
            f"rates must lie in [0, MAX_RATE = {MAX_RATE}]; got values in "
            f"[{rates.min().item():.4g}, {rates.max().item():.4g}]"
        )


def _check_params(params: object, z: Tensor) -> ArcParams:
    """``params`` must be :class:`ArcParams` with ``m`` of shape ``(B, K, *z.shape[1:])``."""
    check_instance("params", params, ArcParams, "an ArcParams")
    assert isinstance(params, ArcParams)
    expected = (z.shape[0], params.m.shape[1], *z.shape[1:])
    if tuple(params.m.shape) != expected:
        raise ValueError(
            f"params.m must have shape (B, K, *z.shape[1:]) = {expected}, got "
            f"{tuple(params.m.shape)}"
        )
    if params.m.device != z.device:
        raise ValueError(f"params are on {params.m.device} but z is on {z.device}")
    return params


def _check_velocity_time(params: object, s: object) -> None:
    """``params`` must be :class:`ArcParams` and ``s`` a ``(B,)`` time no later than its ``s0``."""
    check_instance("params", params, ArcParams, "an ArcParams")
    assert isinstance(params, ArcParams)
    check_interval(s, params.s0, names=("s", "params.s0"), batch=params.m.shape[0])


# ---------------------------------------------------------------------------------------------
# The closed form
# ---------------------------------------------------------------------------------------------


def _phi1(x: Tensor) -> Tensor:
    """``(e^x - 1) / x`` with its limit 1 at ``x = 0``, stable in value and gradient."""
    small = x.abs() < _SERIES_THRESHOLD
    safe = torch.where(small, torch.ones_like(x), x)
    series = 1 + x * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x / 720))))
    return torch.where(small, series, torch.expm1(safe) / safe)


def _time_view(s: Tensor, m: Tensor, dtype: torch.dtype) -> Tensor:
    """A ``(B,)`` time as ``(B, 1, ..., 1)`` broadcasting over ``m`` ``(B, K, *Z)``."""
    return expand_time(s, m).to(dtype)


def _arc_velocity(params: ArcParams, s: Tensor) -> Tensor:
    """Unchecked :func:`arc_velocity`; the result is in the compute dtype."""
    cd = compute_dtype(params.m.dtype)
    tau = _time_view(params.s0, params.m, cd) - _time_view(s, params.m, cd)
    coef = params.weights.to(cd) * torch.exp(params.rates.to(cd) * tau)
    return (coef * params.m.to(cd)).sum(dim=1)


def _arc_step(params: ArcParams, z: Tensor, s_a: Tensor, s_b: Tensor) -> Tensor:
    """Unchecked :func:`arc_step`; the result is in the compute dtype."""
    cd = compute_dtype(z.dtype)
    m = params.m
    s0, sa, sb = (_time_view(s, m, cd) for s in (params.s0, s_a, s_b))
    gap = sa - sb
    rates = params.rates.to(cd)
    coef = params.weights.to(cd) * torch.exp(rates * (s0 - sa)) * gap * _phi1(rates * gap)
    return z.to(cd) - (coef * m.to(cd)).sum(dim=1)


def arc_velocity(params: ArcParams, s: Tensor) -> Tensor:
    r"""The student's velocity at time ``s`` inside the step starting at ``params.s0``.

    ArcFlow's momentum mixture (arXiv 2602.09014):

    .. math::

        v(s) = \sum_k \pi_k\, m_k\, e^{g_k (s_0 - s)}, \qquad s \le s_0.

    Args:
        params: the step's mixture, ``m`` of shape ``(B, K, *Z)``.
        s: times ``(B,)`` with ``s <= params.s0``.

    Returns:
        velocity ``(B, *Z)`` in the dtype of ``params.m`` (computed in fp32 at least).

    Raises:
        TypeError: ``params`` is not :class:`ArcParams` or ``s`` is not a floating tensor.
        ValueError: ``s`` is not ``(B,)`` in ``[0, 1]`` or lies after ``params.s0``.
    """
    _check_velocity_time(params, s)
    return _arc_velocity(params, s).to(params.m.dtype)


def arc_step(params: ArcParams, z: Tensor, s_a: Tensor, s_b: Tensor) -> Tensor:
    r"""Integrate the momentum mixture exactly from ``s_a`` down to ``s_b``.

    Since ``dz/ds = v(s)`` and ``v`` does not depend on ``z``,
    ``z_b = z_a - \int_{s_b}^{s_a} v(s) ds``. For one component, with ``D = s_a - s_b``,

    .. math::

        \int_{s_b}^{s_a} e^{g (s_0 - s)} ds
        = \frac{e^{g (s_0 - s_b)} - e^{g (s_0 - s_a)}}{g}
        = e^{g (s_0 - s_a)}\, D\, \frac{e^{g D} - 1}{g D},

    so (ArcFlow's analytic solver, arXiv 2602.09014)

    .. math::

        z_b = z_a - \sum_k \pi_k\, m_k\, e^{g_k (s_0 - s_a)}\, D\, \varphi_1(g_k D),
        \qquad \varphi_1(x) = \frac{e^x - 1}{x} = \frac{\mathrm{expm1}(x)}{x},

    with ``phi_1(0) = 1`` (a Taylor series near 0 keeps value and gradient exact); a rate of
    0 gives the Euler step ``z_a - D pi_k m_k``. Steps compose: ``a -> b -> c`` equals
    ``a -> c``.

    Args:
        params: the step's mixture, ``m`` of shape ``(B, K, *Z)``.
        z: state ``(B, *Z)`` at ``s_a``.
        s_a: start times ``(B,)``, ``s_a <= params.s0``.
        s_b: end times ``(B,)``, ``s_b <= s_a``.

    Returns:
        state ``(B, *Z)`` at ``s_b``, in the dtype of ``z`` (computed in fp32 at least).

    Raises:
        TypeError: a bad argument type.
        ValueError: mismatched shapes or devices, times outside ``[0, 1]``, or not
            ``s_b <= s_a <= params.s0``.
    """
    check_tensor("z", z, ndim_min=1)
    _check_params(params, z)
    check_interval(s_a, params.s0, z, names=("s_a", "params.s0"))
    check_interval(s_b, s_a, z, names=("s_b", "s_a"))
    return _arc_step(params, z, s_a, s_b).to(z.dtype)


def arc_velocity_error(params: ArcParams, s: Tensor, target: Tensor) -> Tensor:
    """Per-sample squared error ``mean((v(s) - target)^2)`` of the mixture's velocity at ``s``.

    ArcFlow's velocity matching (arXiv 2602.09014): the student's velocity inside a step is
    regressed on the teacher's velocity at the student's own state.

    Args:
        params: the step's mixture, ``m`` of shape ``(B, K, *Z)``.
        s: times ``(B,)`` with ``s <= params.s0``.
        target: teacher velocity ``(B, *Z)`` at ``s``.

    Returns:
        ``(B,)`` mean squared errors in the compute dtype (fp32 at least).
    """
    _check_velocity_time(params, s)
    check_tensor("target", target)
    shape = (params.m.shape[0], *params.m.shape[2:])
    if tuple(target.shape) != shape or target.device != params.m.device:
        raise ValueError(
            f"target must have shape {shape} on {params.m.device}, got "
            f"{tuple(target.shape)} on {target.device}"
        )
    return _squared_error(_arc_velocity(params, s), target)


def _squared_error(v: Tensor, target: Tensor) -> Tensor:
    diff = v - target.to(v.dtype)
    return diff.square().flatten(1).mean(dim=1)


# ---------------------------------------------------------------------------------------------
# The head
# ---------------------------------------------------------------------------------------------


def _capped_softplus(x: Tensor, max_rate: float) -> Tensor:
    """``max_rate * tanh(softplus(x) / max_rate)``: softplus near 0, saturating at ``max_rate``."""
    return max_rate * torch.tanh(nn.functional.softplus(x) / max_rate)


def _inverse_capped_softplus(g: float, max_rate: float) -> float:
    y = max_rate * math.atanh(g / max_rate)
    return math.log(math.expm1(y))


def _check_max_rate(max_rate: object) -> float:
    if isinstance(max_rate, bool) or not isinstance(max_rate, int | float):
        raise TypeError(f"max_rate must be a float, got {type(max_rate).__name__}")
    if not 0 < max_rate <= MAX_RATE:
        raise ValueError(f"max_rate must lie in (0, MAX_RATE = {MAX_RATE}], got {max_rate}")
    return float(max_rate)


def split_arc_output(
    raw: Tensor, s0: Tensor, *, num_components: int, max_rate: float = 10.0
) -> ArcParams:
    """Split a backbone output into the momentum mixture (the channel layout of the head).

    Layout along dim 1 of ``raw`` ``(B, K*(C+2), *S)``:
    ``[m_0 (C) | m_1 (C) | ... | m_{K-1} (C) | logit_0 ... logit_{K-1} | rate_0 ... rate_{K-1}]``.
    The mixture is per position: ``pi = softmax_k(logits)`` and
    ``g = max_rate * tanh(softplus(rate) / max_rate)`` are shared across the C channels of a
    position, and ``g_0 = 0`` is forced (its channel is ignored), so component 0 is a
    constant velocity (ArcFlow, arXiv 2602.09014).

    Args:
        raw: backbone output ``(B, K*(C+2), *S)``.
        s0: source times ``(B,)`` of the step.
        num_components: ``K >= 1``.
        max_rate: smooth cap on the rates, in ``(0, MAX_RATE]``.

    Returns:
        :class:`ArcParams` with ``m (B, K, C, *S)``, weights and rates ``(B, K, 1, *S)``
        (weights and rates in fp32 at least).
    """
    k = check_positive_int("num_components", num_components)
    max_rate = _check_max_rate(max_rate)
    check_tensor("raw", raw, ndim_min=2)
    if raw.shape[1] % k or raw.shape[1] // k < 3:
        raise ValueError(
            f"raw must have K*(C+2) channels in dim 1 with K = {k} and C >= 1, "
            f"got shape {tuple(raw.shape)}"
        )
    c = raw.shape[1] // k - 2
    rest = raw.shape[2:]
    m = raw[:, : k * c].reshape(raw.shape[0], k, c, *rest)
    cd = compute_dtype(raw.dtype)
    logits = raw[:, k * c : k * c + k].unsqueeze(2).to(cd)
    rate_raw = raw[:, k * c + k :].unsqueeze(2).to(cd)
    rates = torch.cat(
        [torch.zeros_like(rate_raw[:, :1]), _capped_softplus(rate_raw[:, 1:], max_rate)], dim=1
    )
    return ArcParams(m=m, weights=torch.softmax(logits, dim=1), rates=rates, s0=s0)


class ArcFlowHead(nn.Module):
    """A per-position linear head from backbone features to the momentum mixture.

    Maps features ``(B, F, *S)`` (channels in dim 1) through one linear layer to the
    layout of :func:`split_arc_output` ``(B, K*(C+2), *S)``. Initialised so that the
    mixture is one constant velocity (see :meth:`reset_constant_velocity`): with a copied
    velocity projection the step starts as the pretrained model's Euler step.

    Args:
        in_channels: feature channels ``F``.
        channels: channels ``C`` of the state ``z``.
        num_components: ``K >= 1`` (ArcFlow, arXiv 2602.09014).
        max_rate: smooth cap on the rates, in ``(0, MAX_RATE]``.
    """

    def __init__(
        self, in_channels: int, channels: int, num_components: int = 2, *, max_rate: float = 10.0
    ) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        self.channels = check_positive_int("channels", channels)
        self.num_components = check_positive_int("num_components", num_components)
        self.max_rate = _check_max_rate(max_rate)
        self.proj = nn.Linear(in_channels, num_components * (channels + 2))
        self.reset_constant_velocity()

    @classmethod
    def from_velocity_projection(
        cls, linear: nn.Linear, num_components: int = 2, *, max_rate: float = 10.0
    ) -> ArcFlowHead:
        """A head whose initial velocity is that of a pretrained projection ``F -> C``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        head = cls(linear.in_features, linear.out_features, num_components, max_rate=max_rate).to(
            device=linear.weight.device, dtype=linear.weight.dtype
        )
        head.reset_constant_velocity(linear.weight, linear.bias)
        return head

    @torch.no_grad()
    def reset_constant_velocity(
        self, velocity_weight: Tensor | None = None, velocity_bias: Tensor | None = None
    ) -> None:
        """Make the mixture a single constant velocity ``W f + b``.

        The logits rows are zeroed (uniform weights ``1/K``), the components ``k >= 1`` are
        zeroed and component 0 (rate 0) holds ``K`` times the velocity projection, so
        ``v(s) = pi_0 m_0 = W f + b`` for every ``s`` (up to the rounding of ``K / K``).
        The rate rows get zero weights and biases giving distinct initial rates
        ``g_k = k * min(1, max_rate / (2 (K - 1)))``, so that the components, zero at
        first, do not stay identical under training.

        Args:
            velocity_weight: ``(C, F)``; when None the current component-0 rows are kept
                (the constant velocity is then ``1/K`` of their output).
            velocity_bias: ``(C,)``; zero when None.
        """
        k, c = self.num_components, self.channels
        w, b = self.proj.weight, self.proj.bias
        if velocity_weight is not None:
            check_shape("velocity_weight", velocity_weight, (c, w.shape[1]))
            w[:c] = k * velocity_weight.to(w.dtype)
        if velocity_bias is not None:
            check_shape("velocity_bias", velocity_bias, (c,))
        b[:c] = 0 if velocity_bias is None else k * velocity_bias.to(b.dtype)
        w[c:].zero_()
        b[c:].zero_()
        if k > 1:
            unit = min(1.0, self.max_rate / (2 * (k - 1)))
            raw = [_inverse_capped_softplus(j * unit, self.max_rate) for j in range(1, k)]
            b[k * c + k + 1 :] = torch.tensor(raw, dtype=b.dtype)

    def forward(self, features: Tensor, s0: Tensor) -> ArcParams:
        """Features ``(B, F, *S)`` and source times ``(B,)`` -> :class:`ArcParams`."""
        check_tensor("features", features, ndim_min=2)
        if features.shape[1] != self.proj.in_features:
            raise ValueError(
                f"features must have {self.proj.in_features} channels in dim 1, "
                f"got shape {tuple(features.shape)}"
            )
        raw = self.proj(features.movedim(1, -1)).movedim(-1, 1)
        return split_arc_output(raw, s0, num_components=self.num_components, max_rate=self.max_rate)


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
    _check_params(params, z)
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
            z = _substeps(params, z, times[i], times[i + 1], n_sub, states)
    return (z, torch.stack(states)) if return_trajectory else z


def _substeps(
    params: ArcParams, z: Tensor, s_start: Tensor, s_end: Tensor, n: int, states: list
) -> Tensor:
    """Closed-form sub-steps from ``s_start`` to ``s_end``, appending each state."""
    fractions = torch.linspace(0.0, 1.0, n + 1, device=z.device, dtype=torch.float64)
    knots = s_start.double() + fractions * (s_end.double() - s_start.double())
    z_start = z
    for j in range(n):
        s_b = _batch_time(knots[j + 1], z)
        z = _arc_step(params, z_start, params.s0, s_b).to(z_start.dtype)
        states.append(z)
    check_finite("sample_arcflow state", z)
    return z


# ---------------------------------------------------------------------------------------------
# Trajectory distillation
# ---------------------------------------------------------------------------------------------


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
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = {"start", "decay_steps", "power"} - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}")
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
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if "num_calls" not in state or "mix_schedule" not in state:
            raise ValueError("state must hold 'num_calls' and 'mix_schedule'")
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
        per_sample, stats = self._rollout(student, teacher, noise, times, p_mix, cond, generator)
        suspects = [("noise", noise), ("the student's weights", student)]
        return self._reduce(per_sample, stats, p_mix, times, lambda: suspects)

    def _rollout(
        self, student, teacher, noise, times, p_mix, cond, generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-sample error ``(B,)`` summed over steps and points, plus rollout statistics."""
        z = noise.detach()
        err = torch.zeros(z.shape[0], dtype=compute_dtype(z.dtype), device=z.device)
        mixed, rate_sum = err.new_zeros(()), err.new_zeros(())
        n_steps = times.shape[0] - 1
        for i in range(n_steps):
            s0, s1 = _batch_time(times[i], z), _batch_time(times[i + 1], z)
            params = _call_student(student, z, s0, cond)
            err = err + self._match(params, z, s1, teacher, cond, generator)
            rate_sum = rate_sum + params.rates.detach().float().mean().to(err.dtype)
            with torch.no_grad():
                z, n_mixed = self._advance(params, z, s1, teacher, p_mix, cond, generator)
            mixed = mixed + n_mixed
        stats = {
            "rate_mean": rate_sum / n_steps,
            "teacher_fraction": mixed / (n_steps * z.shape[0]),
        }
        return err / (n_steps * self.points_per_step), stats

    def _match(self, params, z, s1, teacher, cond, generator) -> Tensor:
        """Sum over sampled times of the per-sample velocity error ``(B,)``."""
        detached = params.detach()
        total = 0
        for _ in range(self.points_per_step):
            u = torch.rand(z.shape[0], generator=generator, device=z.device, dtype=s1.dtype)
            s = s1 + u * (params.s0 - s1)
            with torch.no_grad():
                z_s = _arc_step(detached, z, params.s0, s).to(z.dtype)
                target = teacher(z_s, s, **cond)
            check_finite("teacher velocity", target)
            total = total + _squared_error(_arc_velocity(params, s), target)
        return total

    def _advance(self, params, z, s1, teacher, p_mix, cond, generator) -> tuple[Tensor, Tensor]:
        """The next state: the student's closed-form step, or teacher Euler steps (prob p_mix)."""
        z_next = _arc_step(params.detach(), z, params.s0, s1).to(z.dtype)
        if p_mix <= 0:
            return z_next, z_next.new_zeros((), dtype=torch.float32)
        draw = torch.rand(z.shape[0], generator=generator, device=z.device) < p_mix
        if not bool(draw.any()):
            return z_next, z_next.new_zeros((), dtype=torch.float32)
        z_teacher = self._teacher_euler(teacher, z, params.s0, s1, cond)
        z_next = torch.where(expand_time(draw, z), z_teacher, z_next)
        return z_next, draw.float().sum()

    def _teacher_euler(self, teacher, z, s0, s1, cond) -> Tensor:
        n = self.teacher_substeps
        h = (s1 - s0) / n
        work = z.to(h.dtype)  # the Euler state stays in the time's (compute) dtype
        for j in range(n):
            s = s0 + j * h
            work = work + expand_time(h, z) * teacher(work.to(z.dtype), s, **cond).to(h.dtype)
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
