"""The rectified-flow path ``z_t = (1 - t) x + t eps`` and a point on it, with the arithmetic
every module shares: times broadcast over states, and the dtype coefficients are computed in.

Convention: ``t = 0`` is data, ``t = 1`` is noise. Shapes: states ``(B, ...)``, times
``(B,)``. A :class:`FlowPoint` is what a target or the JVP needs at one point of the flow:
the state, the two times, the flow's velocity there and the conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mfcore._checks import check_like, check_tensor, check_time

__all__ = ["FlowPoint", "sample_path", "expand_time", "compute_dtype"]


@dataclass(frozen=True)
class FlowPoint:
    """A point of the flow, what a target and the JVP take: the state ``z (B, ...)`` at times
    ``t (B,)``, the end times ``r (B,)`` of the interval ``[r, t]``, the flow's velocity
    ``v = dz/dt (B, ...)`` there and the conditioning (keyword arguments of the models).

    Example:
        >>> import torch
        >>> point = FlowPoint(torch.ones(2, 3), torch.zeros(2), torch.ones(2), torch.zeros(2, 3))
        >>> point.cond, tuple(point.z.shape)
        ({}, (2, 3))
    """

    z: Tensor
    r: Tensor
    t: Tensor
    v: Tensor
    cond: dict[str, Any] = field(default_factory=dict)


def sample_path(x: Tensor, noise: Tensor, t: Tensor, *, validate: bool = True) -> Tensor:
    """The rectified-flow path ``z_t = (1 - t) x + t eps`` (t = 0 data, t = 1 noise).

    Args:
        x: clean samples ``(B, ...)``, floating.
        noise: Gaussian noise ``(B, ...)``, the shape and device of ``x``.
        t: times ``(B,)`` in ``[0, 1]``.
        validate: check the arguments (off for arguments checked already).

    Returns:
        ``z_t`` of shape ``(B, ...)`` in the dtype of ``x`` (coefficients in fp32 at least).
    """
    if validate:
        check_tensor("x", x, ndim_min=1)
        check_like("noise", noise, x, "x")
        check_time("t", t, x)
    work = compute_dtype(x.dtype)
    tt = expand_time(t.to(work), x)
    return ((1 - tt) * x.to(work) + tt * noise.to(work)).to(x.dtype)


def expand_time(t: Tensor, z: Tensor) -> Tensor:
    """Reshape a ``(B,)`` time to ``(B, 1, ..., 1)`` to broadcast over ``z`` ``(B, ...)``."""
    if t.ndim != 1 or t.shape[0] != z.shape[0]:
        raise ValueError(
            f"time of shape {tuple(t.shape)} does not match the batch of z {tuple(z.shape)}"
        )
    return t.reshape(t.shape[0], *([1] * (z.ndim - 1)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype targets and time coefficients are computed in: fp32 at least, fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
