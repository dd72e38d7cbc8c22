"""ArcFlow's momentum mixture: its parameters, its closed form and the head that predicts it.

At the source time ``s0`` of a step the student predicts ``K`` velocity components ``m_k``,
weights ``pi_k`` and non-negative rates ``g_k`` (:class:`ArcParams`), and the velocity inside
the step is ``v(s) = sum_k pi_k m_k exp(g_k (s0 - s))`` (ArcFlow, Yang et al., arXiv
2602.09014), integrated exactly (:func:`arc_step`). :class:`ArcFlowHead` turns a backbone's
output into such a mixture. Conventions and shapes as in :mod:`mfcore.arcflow`, which
samples and distils with them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from mfcore._checks import (
    check_instance,
    check_interval,
    check_positive_int,
    check_same_device,
    check_shape,
    check_tensor,
    check_time,
    check_values_finite,
)
from mfcore.path import compute_dtype, expand_time

__all__ = [
    "MAX_RATE",
    "ArcParams",
    "ArcFlowStudent",
    "check_arc_params",
    "arc_velocity",
    "arc_step",
    "arc_velocity_error",
    "split_arc_output",
    "ArcFlowHead",
]

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
        check_same_device("s0", self.s0, self.m, "m")
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
    check_same_device(name, x, m, "m")
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


def check_arc_params(params: object, z: Tensor) -> ArcParams:
    """``params`` must be :class:`ArcParams` with ``m`` of shape ``(B, K, *z.shape[1:])``."""
    check_instance("params", params, ArcParams, "an ArcParams")
    assert isinstance(params, ArcParams)
    expected = (z.shape[0], params.m.shape[1], *z.shape[1:])
    if tuple(params.m.shape) != expected:
        raise ValueError(
            f"params.m must have shape (B, K, *z.shape[1:]) = {expected}, got "
            f"{tuple(params.m.shape)}"
        )
    check_same_device("params.m", params.m, z, "z")
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


def arc_velocity(params: ArcParams, s: Tensor, *, validate: bool = True) -> Tensor:
    r"""The student's velocity at time ``s`` inside the step starting at ``params.s0``.

    ArcFlow's momentum mixture (arXiv 2602.09014):

    .. math::

        v(s) = \sum_k \pi_k\, m_k\, e^{g_k (s_0 - s)}, \qquad s \le s_0.

    Args:
        params: the step's mixture, ``m`` of shape ``(B, K, *Z)``.
        s: times ``(B,)`` with ``s <= params.s0``.
        validate: check the arguments (off for arguments checked already).

    Returns:
        velocity ``(B, *Z)`` in the dtype of ``params.m`` (computed in fp32 at least).

    Raises:
        TypeError: ``params`` is not :class:`ArcParams` or ``s`` is not a floating tensor.
        ValueError: ``s`` is not ``(B,)`` in ``[0, 1]`` or lies after ``params.s0``.
    """
    if validate:
        _check_velocity_time(params, s)
    return _arc_velocity(params, s).to(params.m.dtype)


def arc_step(
    params: ArcParams, z: Tensor, s_a: Tensor, s_b: Tensor, *, validate: bool = True
) -> Tensor:
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
        validate: check the arguments (off for arguments checked already).

    Returns:
        state ``(B, *Z)`` at ``s_b``, in the dtype of ``z`` (computed in fp32 at least).

    Raises:
        TypeError: a bad argument type.
        ValueError: mismatched shapes or devices, times outside ``[0, 1]``, or not
            ``s_b <= s_a <= params.s0``.
    """
    if validate:
        check_tensor("z", z, ndim_min=1)
        check_arc_params(params, z)
        check_interval(s_a, params.s0, z, names=("s_a", "params.s0"))
        check_interval(s_b, s_a, z, names=("s_b", "s_a"))
    return _arc_step(params, z, s_a, s_b).to(z.dtype)


def arc_velocity_error(
    params: ArcParams, s: Tensor, target: Tensor, *, validate: bool = True
) -> Tensor:
    """Per-sample squared error ``mean((v(s) - target)^2)`` of the mixture's velocity at ``s``.

    ArcFlow's velocity matching (arXiv 2602.09014): the student's velocity inside a step is
    regressed on the teacher's velocity at the student's own state.

    Args:
        params: the step's mixture, ``m`` of shape ``(B, K, *Z)``.
        s: times ``(B,)`` with ``s <= params.s0``.
        target: teacher velocity ``(B, *Z)`` at ``s``.
        validate: check the arguments (off for arguments checked already).

    Returns:
        ``(B,)`` mean squared errors in the compute dtype (fp32 at least).
    """
    if validate:
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
        check_instance("linear", linear, nn.Linear, "an nn.Linear")
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
