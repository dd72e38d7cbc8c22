"""Time shifts and few-step sampling grids.

Convention: ``t = 0`` is data, ``t = 1`` is noise. A shift maps times in ``[0, 1]`` onto
themselves, fixing 0 and 1:

- :func:`shift_time`, the static shift of SD3 (Esser et al., arXiv 2403.03206, eq. 23);
- :func:`exponential_shift`, FLUX.1's resolution-dependent shift, with a ``mu`` from
  :func:`resolution_shift_mu`.

Both are the same map in logit space: ``logit(shift_time(t, s)) = logit(t) + log(s)`` and
``exponential_shift(t, mu) = shift_time(t, exp(mu))``; a shift above 1 (``mu > 0``) moves
time towards the noise end. Few-step samplers run along a decreasing grid from exactly 1 to
exactly 0: :func:`uniform_grid` and :func:`shifted_grid`. Time samplers that shift their
draws are in :mod:`mfcore.time`.

Coefficients are computed in fp32 at least (fp64 stays fp64) and cast to the requested
dtype at the end.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mfcore._checks import check_device, check_dtype, check_positive_int, check_real, check_unit
from mfcore.path import compute_dtype

__all__ = [
    "shift_of_mu",
    "shift_time",
    "exponential_shift",
    "resolution_shift_mu",
    "uniform_grid",
    "shifted_grid",
]

DeviceLike = str | torch.device | None


def shift_of_mu(mu: object) -> float:
    """The static shift ``exp(mu)`` of a log-shift ``mu``: a finite ``mu`` whose exponential
    is a finite positive float (``ValueError`` otherwise)."""
    mu = check_real("mu", mu)
    scale = math.exp(mu) if mu < 709.0 else math.inf
    if not 0.0 < scale < math.inf:
        raise ValueError(f"mu must keep exp(mu) a finite positive float, got mu = {mu}")
    return scale


# --------------------------------------------------------------------------- shifts


def _shift(t: Tensor, scale: float) -> Tensor:
    """``s t / (s t + 1 - t)`` in fp32 at least; exact at ``t = 0`` and ``t = 1``."""
    work = compute_dtype(t.dtype)
    tc = t.to(work)
    # A shift beyond the dtype's range is capped there (s t stays finite, so t = 0 maps to
    # 0 and not inf * 0); a tiny one underflows s t to 0, and the limit at t = 1 (0 / 0)
    # is 1. Either way no NaN.
    st = min(scale, torch.finfo(work).max) * tc
    den = st + (1.0 - tc)
    out = torch.where(den == 0, torch.ones_like(tc), st / torch.where(den == 0, 1.0, den))
    return out.to(t.dtype)


def shift_time(t: Tensor, shift: float, *, validate: bool = True) -> Tensor:
    """Static time shift ``t' = s t / (1 + (s - 1) t)`` (SD3, arXiv 2403.03206, eq. 23).

    Equivalently ``logit(t') = logit(t) + log(s)``: ``s > 1`` moves times towards noise
    (``t = 1``), ``s < 1`` towards data, ``s = 1`` is the identity; the inverse map is the
    shift by ``1 / s``. Computed as ``s t / (s t + (1 - t))``, so 0 and 1 map to themselves exactly.

    Args:
        t: times of any shape, floating, in ``[0, 1]``.
        shift: the factor ``s > 0``.
        validate: check the arguments (off for arguments checked already).

    Returns:
        shifted times, shape and dtype of ``t`` (computed in fp32 at least).
    """
    if validate:
        check_unit("t", t)
        shift = check_real("shift", shift, minimum=0.0, strict=True)
    return _shift(t, shift)


def exponential_shift(t: Tensor, mu: float) -> Tensor:
    """Resolution-dependent shift ``t' = e^mu / (e^mu + (1/t - 1))`` (FLUX.1's ``time_shift``).

    This is :func:`shift_time` with ``s = exp(mu)``; it is evaluated as
    ``e^mu t / (e^mu t + (1 - t))``, which never divides by ``t``: ``t = 0`` gives 0 and
    ``t = 1`` gives 1, with no NaN.

    Args:
        t: times of any shape, floating, in ``[0, 1]``.
        mu: the log-shift (see :func:`resolution_shift_mu`); any finite real with finite
            ``exp(mu) > 0``.

    Returns:
        shifted times, shape and dtype of ``t`` (computed in fp32 at least).
    """
    check_unit("t", t)
    return _shift(t, shift_of_mu(mu))


def resolution_shift_mu(
    seq_len: int,
    *,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The log-shift ``mu`` of FLUX.1, linear in the image's token count.

    ``mu = base_shift + (max_shift - base_shift) * (seq_len - base_seq_len) /
    (max_seq_len - base_seq_len)``: ``base_shift`` at ``base_seq_len`` tokens, ``max_shift``
    at ``max_seq_len`` tokens, extrapolated linearly outside (as FLUX.1 does). The defaults are
    FLUX.1's (256 tokens for 256x256 images, 4096 for 1024x1024 with 2x2 patches of a 16x latent).

    Args:
        seq_len: number of image tokens, ``>= 1``.
        base_seq_len: token count where ``mu = base_shift``.
        max_seq_len: token count where ``mu = max_shift``; ``> base_seq_len``.
        base_shift: ``mu`` at ``base_seq_len``.
        max_shift: ``mu`` at ``max_seq_len``.

    Returns:
        ``mu`` as a Python float; use it with :func:`exponential_shift`.
    """
    seq_len = check_positive_int("seq_len", seq_len)
    base_seq_len = check_positive_int("base_seq_len", base_seq_len)
    max_seq_len = check_positive_int("max_seq_len", max_seq_len)
    if max_seq_len <= base_seq_len:
        raise ValueError(f"max_seq_len must be > base_seq_len, got {max_seq_len} <= {base_seq_len}")
    base = check_real("base_shift", base_shift)
    slope = (check_real("max_shift", max_shift) - base) / (max_seq_len - base_seq_len)
    return base + slope * (seq_len - base_seq_len)


# --------------------------------------------------------------------------- grids


def _unit_grid(steps: int) -> Tensor:
    """``(steps + 1,)`` float64 CPU grid from exactly 1 down to exactly 0."""
    return torch.arange(steps, -1, -1, dtype=torch.float64) / steps


def _cast_grid(grid: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A float64 grid in ``dtype`` on ``device``; raise if the cast merges neighbouring times
    (``uniform_grid(1000)`` in bf16 would repeat 494 of them: zero-length steps)."""
    out = grid.to(dtype)
    if not bool((out[1:] < out[:-1]).all()):
        raise ValueError(
            f"a {grid.shape[0] - 1}-step grid is not representable in {dtype}: neighbouring "
            "times round to the same value; build it in torch.float32 or torch.float64"
        )
    return out.to(device)


def uniform_grid(
    steps: int, *, device: DeviceLike = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Uniform sampling grid ``t_i = 1 - i / steps``, ``i = 0, ..., steps``.

    Built in float64 and cast, so the endpoints are exactly 1 and 0; a ``dtype`` too coarse
    to keep every time distinct (bf16 beyond a few dozen steps) raises ``ValueError``.

    Args:
        steps: number of steps ``N >= 1``.
        device: device of the result (default: torch's default device).
        dtype: floating dtype of the result.

    Returns:
        times ``(N + 1,)``, decreasing from 1 (noise) to 0 (data).

    Example:
        >>> from mfcore import uniform_grid
        >>> uniform_grid(4)
        tensor([1.0000, 0.7500, 0.5000, 0.2500, 0.0000])
    """
    steps = check_positive_int("steps", steps)
    dev, dtype = check_device(device), check_dtype(dtype)
    return _cast_grid(_unit_grid(steps), dev, dtype)


def shifted_grid(
    steps: int,
    *,
    shift: float | None = None,
    mu: float | None = None,
    device: DeviceLike = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The uniform grid, shifted by :func:`shift_time` or :func:`exponential_shift`.

    With ``shift > 1`` (``mu > 0``) the steps are denser near the noise end ``t = 1`` (the
    sampling schedule of SD3 and FLUX.1); with ``shift < 1`` denser near the data end. The
    endpoints stay exactly 1 and 0.

    Args:
        steps: number of steps ``N >= 1``.
        shift: static shift factor ``s > 0``; exactly one of ``shift`` and ``mu``.
        mu: log-shift (e.g. from :func:`resolution_shift_mu`); exactly one of ``shift`` and ``mu``.
        device: device of the result (default: torch's default device).
        dtype: floating dtype of the result.

    Returns:
        times ``(N + 1,)``, decreasing from 1 to 0.

    Example:
        >>> from mfcore import shifted_grid
        >>> shifted_grid(2, shift=3.0)  # the middle time moves towards the noise end
        tensor([1.0000, 0.7500, 0.0000])
    """
    steps = check_positive_int("steps", steps)
    dev, dtype = check_device(device), check_dtype(dtype)
    if (shift is None) == (mu is None):
        raise ValueError("shifted_grid needs exactly one of shift and mu")
    scale = check_real("shift", shift, minimum=0.0, strict=True) if mu is None else shift_of_mu(mu)
    return _cast_grid(_shift(_unit_grid(steps), scale), dev, dtype)
