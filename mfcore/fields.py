"""The two model contracts every piece of mfcore composes on.

A teacher is a :class:`VelocityField` ``v(z, t, **cond)``; a student is a
:class:`MeanVelocityField` ``u(z, r, t, **cond)``. Both return a tensor shaped like ``z``;
times are ``(B,)`` tensors with t = 0 data and t = 1 noise. Adapters turn diffusers models
into these; any plain callable with the same signature works.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["VelocityField", "MeanVelocityField", "velocity_of"]


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
    """The instantaneous velocity of a mean-velocity field: ``v(z, t) = u(z, t, t)``."""

    def v_fn(z: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return u_fn(z, t, t, **cond)

    return v_fn
