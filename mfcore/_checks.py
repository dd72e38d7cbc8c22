"""Input validation shared by every public function (private).

Every public entry point checks its tensors here, so errors name the argument and what
was expected instead of surfacing as a broadcast error (or a silent broadcast) deep
inside a model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_tensor(name: str, x: object, *, floating: bool = True, ndim_min: int = 0) -> Tensor:
    """Raise unless ``x`` is a tensor (floating point when ``floating``) of ``ndim >= ndim_min``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if x.ndim < ndim_min:
        raise ValueError(
            f"{name} must have at least {ndim_min} dimensions, got shape {tuple(x.shape)}"
        )
    return x


def check_like(name: str, x: object, ref: Tensor, ref_name: str = "z") -> Tensor:
    """Raise unless ``x`` is a floating tensor with the shape and device of ``ref``."""
    check_tensor(name, x)
    assert isinstance(x, Tensor)
    if x.shape != ref.shape:
        raise ValueError(
            f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}"
        )
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    return x


def check_time(
    name: str, t: object, z: Tensor | None = None, *, batch: int | None = None
) -> Tensor:
    """Check a time tensor: floating, shape ``(B,)``, finite, in ``[0, 1]``.

    Args:
        name: the argument's name, for the error message.
        t: the candidate time tensor.
        z: optional state of shape ``(B, ...)``; ``t`` must match its batch size and device.
        batch: optional batch size to match when there is no ``z``.

    Returns:
        ``t`` unchanged.
    """
    check_tensor(name, t)
    assert isinstance(t, Tensor)
    if t.ndim != 1:
        raise ValueError(f"{name} must have shape (B,), got {tuple(t.shape)}")
    if z is not None:
        if z.ndim < 1:
            raise ValueError(f"z must have a batch dimension, got shape {tuple(z.shape)}")
        batch = z.shape[0]
        if t.device != z.device:
            raise ValueError(f"{name} is on {t.device} but z is on {z.device}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(
            f"{name} must have shape ({batch},) to match the batch, got {tuple(t.shape)}"
        )
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite")
    if bool(((t < 0) | (t > 1)).any()):
        raise ValueError(
            f"{name} must lie in [0, 1] (t = 0 data, t = 1 noise); "
            f"got values in [{t.min().item():.4g}, {t.max().item():.4g}]"
        )
    return t


def check_interval(r: object, t: object, z: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Check a pair of time tensors ``r <= t`` of shape ``(B,)`` (see :func:`check_time`)."""
    check_time("t", t, z)
    assert isinstance(t, Tensor)
    check_time("r", r, z, batch=t.shape[0])
    assert isinstance(r, Tensor)
    if r.device != t.device:
        raise ValueError(f"r is on {r.device} but t is on {t.device}")
    if bool((r > t).any()):
        raise ValueError("r must satisfy r <= t elementwise (the interval [r, t] runs backwards)")
    return r, t


def check_positive_int(name: str, n: object, *, minimum: int = 1) -> int:
    """Raise unless ``n`` is an int (not a bool) ``>= minimum``."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n}")
    return n


def check_real(name: str, value: object, *, minimum: float, strict: bool = False) -> float:
    """``value`` as a float; raise unless it is a finite real number (not a bool) ``>= minimum``
    (``> minimum`` when ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    low_ok = value > minimum if strict else value >= minimum
    if not (math.isfinite(value) and low_ok):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return float(value)


def check_grid(grid: object, ref: Tensor, *, full_span: bool) -> Tensor:
    """Check a sampling grid: ``(N + 1,)``, ``N >= 1``, on ``ref``'s device, finite, in
    ``[0, 1]`` and strictly decreasing (sampling runs from noise towards data); with
    ``full_span`` it must also run from exactly 1 to exactly 0. Returns ``grid``."""
    check_tensor("grid", grid)
    assert isinstance(grid, Tensor)
    if grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(f"grid must have shape (N + 1,) with N >= 1, got {tuple(grid.shape)}")
    if grid.device != ref.device:
        raise ValueError(f"grid is on {grid.device} but noise is on {ref.device}")
    if not bool(torch.isfinite(grid).all()) or bool(((grid < 0) | (grid > 1)).any()):
        raise ValueError("grid must be finite and lie in [0, 1]")
    if full_span and (grid[0].item() != 1.0 or grid[-1].item() != 0.0):
        raise ValueError(
            f"grid must run from exactly 1 (noise) to exactly 0 (data), "
            f"got {grid[0].item():.6g} to {grid[-1].item():.6g}"
        )
    if bool((grid[1:] >= grid[:-1]).any()):
        raise ValueError("grid must be strictly decreasing (sampling runs from 1 towards 0)")
    return grid


def check_choice(name: str, value: object, choices: dict | tuple | list) -> str:
    """Raise unless ``value`` is one of ``choices`` (listing the valid ones)."""
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {valid}; got {value!r}")
    return value


def check_finite(name: str, x: Tensor) -> Tensor:
    """Raise if ``x`` holds a NaN or an infinity (instead of passing it on quietly)."""
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"{name} is not finite (NaN or inf)")
    return x


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
