"""Time samplers (the shifts and sampling grids live in :mod:`mfcore.schedule`).

Convention: ``t = 0`` is data, ``t = 1`` is noise, ``z_t = (1 - t) x + t eps``.

Training draws times from a *sampler*: a callable
``sampler(batch_size, *, device=None, dtype=torch.float32, generator=None) -> (B,)``.
The samplers here are small frozen dataclasses (so they compare, print and pickle):

- :class:`UniformTime` and :class:`LogitNormalTime` (``t = sigmoid(n)``, ``n ~ N(mean, std)``;
  SD3, Esser et al., arXiv 2403.03206, sec. 3.1);
- :class:`ShiftedTime` applies the static shift :func:`shift_time` (SD3, eq. 23);
- :class:`ResolutionShiftedTime` applies the resolution-dependent shift
  :func:`exponential_shift` with a ``mu`` from :func:`resolution_shift_mu` (as FLUX.1 does);
- :class:`TimePairSampler` draws the ``(r, t)`` pairs of MeanFlow (Geng et al., arXiv 2505.13447,
  sec. 4.3 and Table 1: logit-normal(-0.4, 1.0) with 25% of the pairs ``r != t``);
- :class:`ClampedPairSampler` keeps ``t``'s own law and clamps ``r = min(t, r')``, with a
  Bernoulli choice of the ``r = t`` pairs: py-meanflow's default ("v1") pair sampler;
- :class:`GridPairSampler` replaces a share of another sampler's pairs by the intervals of
  few-step sampling grids, the maps a 1- or 2-step student is used for.

Both shifts are the same map in logit space: ``logit(shift_time(t, s)) = logit(t) + log(s)``
and ``exponential_shift(t, mu) = shift_time(t, exp(mu))``; a shift above 1 (``mu > 0``) moves
time towards the noise end.

Few-step samplers run along a decreasing grid from exactly 1 to exactly 0:
:func:`uniform_grid` and :func:`shifted_grid`.

Draws and time coefficients are computed in fp32 at least (fp64 stays fp64) and cast to the
requested dtype at the end.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from mfcore._checks import (
    check_callable,
    check_device,
    check_dtype,
    check_fraction,
    check_generator,
    check_positive_int,
    check_real,
    check_tensor,
)
from mfcore.path import compute_dtype
from mfcore.schedule import (
    DeviceLike,
    exponential_shift,
    resolution_shift_mu,
    shift_of_mu,
    shift_time,
    shifted_grid,
    uniform_grid,
)

__all__ = [
    "TimeSampler",
    "UniformTime",
    "LogitNormalTime",
    "ShiftedTime",
    "ResolutionShiftedTime",
    "TimePairSampler",
    "ClampedPairSampler",
    "GridPairSampler",
    "valid_by_construction",
    "draw_from",
    "shift_time",
    "exponential_shift",
    "resolution_shift_mu",
    "uniform_grid",
    "shifted_grid",
]


@runtime_checkable
class TimeSampler(Protocol):
    """A sampler of times in ``[0, 1]``.

    Args:
        batch_size: number of times ``B`` to draw.
        device: device of the result (default: torch's default device).
        dtype: floating dtype of the result.
        generator: optional :class:`torch.Generator` on ``device``, for reproducible draws.

    Returns:
        times ``(B,)`` in ``[0, 1]``.
    """

    def __call__(
        self,
        batch_size: int,
        *,
        device: DeviceLike = None,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> Tensor: ...


# --------------------------------------------------------------------------- validation


Gen = torch.Generator | None


class _Sampler(ABC):
    """The public call every sampler here shares: check the arguments once, then
    :meth:`draw`, which trusts them (and draws from inner samplers the same way)."""

    def __call__(
        self,
        batch_size: int,
        *,
        device: DeviceLike = None,
        dtype: torch.dtype = torch.float32,
        generator: Gen = None,
    ) -> Any:
        """Draw ``batch_size`` times (see :class:`TimeSampler`) or pairs (see
        :class:`TimePairSampler`)."""
        n = check_positive_int("batch_size", batch_size)
        dev = check_device(device)
        gen = check_generator(generator, dev)
        return self.draw(n, device=dev, dtype=check_dtype(dtype), generator=gen)

    @abstractmethod
    def draw(self, n: int, *, device: torch.device, dtype: torch.dtype, generator: Gen) -> Any: ...


def draw_from(
    sampler: Callable[..., Any], n: int, *, device: torch.device, dtype: torch.dtype, generator: Gen
) -> Any:
    """``sampler``'s draw on checked arguments: :meth:`_Sampler.draw` for a sampler of this
    module whose call is the shared one (no second check), else its public call."""
    if isinstance(sampler, _Sampler) and type(sampler).__call__ is _Sampler.__call__:
        return sampler.draw(n, device=device, dtype=dtype, generator=generator)
    return sampler(n, device=device, dtype=dtype, generator=generator)


# --------------------------------------------------------------------------- samplers


@dataclass(frozen=True)
class UniformTime(_Sampler):
    """Times uniform on ``[low, high]`` (the rectified-flow default).

    Args:
        low: lower end, ``0 <= low < high``.
        high: upper end, ``high <= 1``.
    """

    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        low, high = check_real("low", self.low), check_real("high", self.high)
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"low and high must satisfy 0 <= low < high <= 1, got {low}, {high}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    def draw(self, n: int, *, device: torch.device, dtype: torch.dtype, generator: Gen) -> Tensor:
        """``n`` times ``(n,)`` on checked arguments (see :class:`TimeSampler`)."""
        u = torch.rand(n, device=device, dtype=compute_dtype(dtype), generator=generator)
        return (self.low + (self.high - self.low) * u).to(dtype)


@dataclass(frozen=True)
class LogitNormalTime(_Sampler):
    """Logit-normal times ``t = sigmoid(n)``, ``n ~ N(mean, std^2)`` (SD3, arXiv 2403.03206).

    MeanFlow (arXiv 2505.13447) uses ``mean = -0.4, std = 1.0``: slightly more mass near the
    data end.

    Args:
        mean: mean of ``logit(t)``.
        std: standard deviation of ``logit(t)``, ``> 0``.
    """

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", check_real("mean", self.mean))
        object.__setattr__(self, "std", check_real("std", self.std, minimum=0.0, strict=True))

    def draw(self, n: int, *, device: torch.device, dtype: torch.dtype, generator: Gen) -> Tensor:
        """``n`` times ``(n,)`` on checked arguments (see :class:`TimeSampler`)."""
        normal = torch.randn(n, device=device, dtype=compute_dtype(dtype), generator=generator)
        return torch.sigmoid(self.mean + self.std * normal).to(dtype)


def _draw_shifted(
    base: Callable[..., Tensor],
    scale: float,
    n: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    generator: Gen,
) -> Tensor:
    """Draw from ``base`` in fp32 at least, shift by ``scale``, cast to ``dtype``."""
    t = draw_from(base, n, device=device, dtype=compute_dtype(dtype), generator=generator)
    return shift_time(t, scale, validate=False).to(dtype)


@dataclass(frozen=True)
class ShiftedTime(_Sampler):
    """Times of ``base`` passed through the static shift :func:`shift_time`.

    If ``base`` has CDF ``F``, the shifted times have CDF ``F(shift_time(t, 1 / shift))``.

    Args:
        base: the time sampler to shift.
        shift: the factor ``s > 0`` (``s > 1`` moves times towards noise).
    """

    base: Callable[..., Tensor]
    shift: float

    def __post_init__(self) -> None:
        check_callable("base", self.base)
        object.__setattr__(self, "shift", check_real("shift", self.shift, minimum=0.0, strict=True))

    def draw(self, n: int, *, device: torch.device, dtype: torch.dtype, generator: Gen) -> Tensor:
        """``n`` times ``(n,)`` on checked arguments (see :class:`TimeSampler`)."""
        return _draw_shifted(
            self.base, self.shift, n, device=device, dtype=dtype, generator=generator
        )


@dataclass(frozen=True)
class ResolutionShiftedTime(_Sampler):
    """Times of ``base`` passed through :func:`exponential_shift` with log-shift ``mu``.

    Get ``mu`` for an image from :func:`resolution_shift_mu` (FLUX.1's schedule).

    Args:
        base: the time sampler to shift.
        mu: the log-shift (``mu > 0`` moves times towards noise).
    """

    base: Callable[..., Tensor]
    mu: float

    def __post_init__(self) -> None:
        check_callable("base", self.base)
        shift_of_mu(self.mu)
        object.__setattr__(self, "mu", float(self.mu))

    def draw(self, n: int, *, device: torch.device, dtype: torch.dtype, generator: Gen) -> Tensor:
        """``n`` times ``(n,)`` on checked arguments (see :class:`TimeSampler`)."""
        scale = math.exp(self.mu)
        return _draw_shifted(self.base, scale, n, device=device, dtype=dtype, generator=generator)


def _default_t_sampler() -> LogitNormalTime:
    """MeanFlow's choice for ImageNet 256 (arXiv 2505.13447, Table 1b)."""
    return LogitNormalTime(-0.4, 1.0)


@dataclass(frozen=True)
class TimePairSampler(_Sampler):
    """Pairs ``(r, t)`` with ``r <= t`` for the average velocity ``u(z_t, r, t)`` (MeanFlow).

    Two times are drawn (the first from ``t_sampler``, the second from ``r_sampler``, or
    ``t_sampler`` again when it is ``None``) and ordered so ``r <= t``; then ``r`` is set
    to ``t`` on a randomly placed subset of the batch of size ``equal_fraction * B``, rounded
    *stochastically*: ``floor(f B)`` pairs, plus one more with probability ``frac(f B)``. The
    count is therefore within one of ``f B`` in every batch (exact when ``f B`` is an integer)
    and right on average, which a Bernoulli mask per pair is not for small batches. MeanFlow
    (arXiv 2505.13447, Table 1a) works best with 25% of the pairs ``r != t``
    (``equal_fraction = 0.75``) and logit-normal(-0.4, 1.0) times (Table 1b).

    Args:
        t_sampler: sampler of the first time; ``None`` means ``LogitNormalTime(-0.4, 1.0)``.
        r_sampler: sampler of the second time; ``None`` means ``t_sampler``.
        equal_fraction: fraction of the pairs with ``r = t``, in ``[0, 1]``.

    Example:
        >>> import torch
        >>> from mfcore import TimePairSampler
        >>> sampler = TimePairSampler(equal_fraction=0.5)
        >>> r, t = sampler(8, generator=torch.Generator().manual_seed(0))
        >>> bool((r <= t).all()), int((r == t).sum())
        (True, 4)
    """

    t_sampler: Callable[..., Tensor] | None = None
    r_sampler: Callable[..., Tensor] | None = None
    equal_fraction: float = 0.75

    def __post_init__(self) -> None:
        if self.t_sampler is None:
            object.__setattr__(self, "t_sampler", _default_t_sampler())
        check_callable("t_sampler", self.t_sampler)
        if self.r_sampler is not None:
            check_callable("r_sampler", self.r_sampler)
        fraction = check_fraction("equal_fraction", self.equal_fraction)
        object.__setattr__(self, "equal_fraction", fraction)

    def draw(
        self, n: int, *, device: torch.device, dtype: torch.dtype, generator: Gen
    ) -> tuple[Tensor, Tensor]:
        """``n`` pairs ``(r, t)``, each ``(n,)``, on checked arguments (see
        :class:`TimePairSampler`)."""
        dev, gen = device, generator
        kw = {"device": dev, "dtype": dtype, "generator": gen}
        first = draw_from(self.t_sampler, n, **kw)
        second = draw_from(self.r_sampler or self.t_sampler, n, **kw)
        r, t = torch.minimum(first, second), torch.maximum(first, second)
        return torch.where(self._equal_mask(n, dev, gen), t, r), t

    def _equal_mask(self, n: int, device: torch.device, gen: torch.Generator | None) -> Tensor:
        """A ``(n,)`` bool mask with a stochastically rounded ``equal_fraction * n`` trues."""
        target = self.equal_fraction * n
        whole = round(target) if abs(target - round(target)) < 1e-9 else math.floor(target)
        coin = torch.rand((), device=device, generator=gen)
        count = whole + (coin < target - whole).to(torch.int64)
        return torch.randperm(n, device=device, generator=gen) < count


@dataclass(frozen=True)
class ClampedPairSampler(_Sampler):
    """Pairs ``(r, t)`` with ``t`` drawn on its own and ``r`` clamped below it.

    Per pair: ``t ~ t_sampler`` and ``r' ~ r_sampler``; with probability ``equal_prob``
    (an independent Bernoulli draw per pair) ``r'`` is replaced by ``t``; then
    ``r = min(t, r')``. Unlike :class:`TimePairSampler`, ``t`` keeps ``t_sampler``'s law
    (it is not the larger of two draws) and the number of ``r = t`` pairs varies from batch
    to batch. A pair whose ``r' >= t`` also ends at ``r = t``, so

        P(r != t) = (1 - equal_prob) P(r' < t).

    The defaults are py-meanflow's (Gsunshine/py-meanflow, its default ``tr_sampler="v1"``
    with ``P_mean_t=-0.6, P_std_t=1.6, P_mean_r=-4.0, P_std_r=1.6, ratio=0.75``, where
    ``ratio = 1 - equal_prob`` is the probability of keeping ``r'``):
    ``t ~ logit-normal(-0.6, 1.6)``, ``r' ~ logit-normal(-4.0, 1.6)``. There
    ``logit t - logit r' ~ N(3.4, 1.6^2 * 2)``, so ``P(r' < t) = Phi(3.4 / 2.263) = 0.934``
    and about 70% of the pairs have ``r != t`` (not 75%). The draws come in py-meanflow's
    order (the ``t`` normals, the ``r'`` normals, then the uniforms of the coin), so with the
    same seed and fp32 on the same device the pairs are py-meanflow's, bit for bit.

    Args:
        t_sampler: sampler of ``t``; ``None`` means ``LogitNormalTime(-0.6, 1.6)``.
        r_sampler: sampler of ``r'``; ``None`` means ``LogitNormalTime(-4.0, 1.6)``.
        equal_prob: probability in ``[0, 1]`` that a pair is set to ``r = t`` before the
            clamp.

    Example:
        >>> import torch
        >>> from mfcore import ClampedPairSampler
        >>> r, t = ClampedPairSampler()(1000, generator=torch.Generator().manual_seed(0))
        >>> bool((r <= t).all()), 0.6 < (r != t).float().mean().item() < 0.8
        (True, True)
    """

    t_sampler: Callable[..., Tensor] | None = None
    r_sampler: Callable[..., Tensor] | None = None
    equal_prob: float = 0.25

    def __post_init__(self) -> None:
        if self.t_sampler is None:
            object.__setattr__(self, "t_sampler", LogitNormalTime(-0.6, 1.6))
        if self.r_sampler is None:
            object.__setattr__(self, "r_sampler", LogitNormalTime(-4.0, 1.6))
        check_callable("t_sampler", self.t_sampler)
        check_callable("r_sampler", self.r_sampler)
        object.__setattr__(self, "equal_prob", check_fraction("equal_prob", self.equal_prob))

    def draw(
        self, n: int, *, device: torch.device, dtype: torch.dtype, generator: Gen
    ) -> tuple[Tensor, Tensor]:
        """``n`` pairs ``(r, t)``, each ``(n,)``, on checked arguments (see
        :class:`TimePairSampler`)."""
        dev, gen = device, generator
        kw = {"device": dev, "dtype": dtype, "generator": gen}
        t = draw_from(self.t_sampler, n, **kw)
        second = draw_from(self.r_sampler, n, **kw)
        equal = torch.rand(n, device=dev, generator=gen) < self.equal_prob
        return torch.minimum(t, torch.where(equal, t, second)), t


@dataclass(frozen=True, eq=False)
class GridPairSampler(_Sampler):
    """Pairs of which a share ``fraction`` are intervals of few-step sampling grids.

    Each pair is, with probability ``fraction``, an interval ``[r, t] = [g_{i+1}, g_i]`` of
    one of ``grids`` (the grid, then the interval, drawn uniformly), and otherwise the pair
    of ``base``. Under pairs of two logit-normal or uniform times the long intervals a 1-step
    sampler uses are rare (the density of ``t - r`` vanishes at 1): in the toys a student
    trained on MeanFlow's pairs alone never learned the 1-step map, while one that also saw
    the grid intervals did (docs/toys.md, "the shipped recipe").

    Args:
        base: the other pairs, a sampler returning ``(r, t)`` (e.g. :class:`TimePairSampler`).
        grids: one or more sampling grids, each ``(K + 1,)`` decreasing from 1 to 0 (e.g.
            :func:`uniform_grid` or a model's shifted grid, at 1, 2 and 4 steps).
        fraction: share of grid intervals, in ``[0, 1]``.

    Example:
        >>> import torch
        >>> from mfcore import GridPairSampler, TimePairSampler, uniform_grid
        >>> sampler = GridPairSampler(TimePairSampler(), (uniform_grid(1),), fraction=1.0)
        >>> sampler(3, generator=torch.Generator().manual_seed(0))
        (tensor([0., 0., 0.]), tensor([1., 1., 1.]))
    """

    base: Callable[..., tuple[Tensor, Tensor]]
    grids: tuple[Tensor, ...]
    fraction: float = 0.25

    def __post_init__(self) -> None:
        check_callable("base", self.base)
        grids = tuple(self.grids) if isinstance(self.grids, list | tuple) else (self.grids,)
        if not grids:
            raise ValueError("grids must hold at least one sampling grid")
        for g in grids:
            g = check_tensor("grids", g, ndim_min=1)
            bad = g.ndim != 1 or g.shape[0] < 2 or not bool(torch.isfinite(g).all())
            if bad or g[0] != 1 or g[-1] != 0 or (g[1:] >= g[:-1]).any():
                raise ValueError(f"each of grids must decrease from 1 to 0, got {g.tolist()}")
        # padded to one (n_grids, K_max + 1) float64 table; K per grid
        steps = torch.tensor([g.shape[0] - 1 for g in grids], dtype=torch.float64)
        table = torch.zeros(len(grids), int(steps.max()) + 1, dtype=torch.float64)
        for row, g in zip(table, grids, strict=True):
            row[: g.shape[0]] = g.detach().to("cpu", torch.float64)
        object.__setattr__(self, "grids", grids)
        object.__setattr__(self, "_steps", steps)
        object.__setattr__(self, "_table", table)
        object.__setattr__(self, "_on", {})  # device -> (steps, table): one copy per device
        object.__setattr__(self, "fraction", check_fraction("fraction", self.fraction))

    def draw(
        self, n: int, *, device: torch.device, dtype: torch.dtype, generator: Gen
    ) -> tuple[Tensor, Tensor]:
        """``n`` pairs ``(r, t)``, each ``(n,)``, on checked arguments (see
        :class:`TimePairSampler`)."""
        dev, gen = device, generator
        r, t = draw_from(self.base, n, device=dev, dtype=dtype, generator=gen)
        pick = torch.rand(n, device=dev, generator=gen) < self.fraction
        which = torch.randint(len(self.grids), (n,), device=dev, generator=gen)
        if dev not in self._on:  # (a host-to-device copy waits for the device: once)
            self._on[dev] = (self._steps.to(dev), self._table.to(dev))
        all_steps, table = self._on[dev]
        steps = all_steps[which]
        u = torch.rand(n, device=dev, generator=gen, dtype=torch.float64)
        i = torch.floor(u * steps).long()
        t_grid, r_grid = table[which, i].to(dtype), table[which, i + 1].to(dtype)
        return torch.where(pick, r_grid, r), torch.where(pick, t_grid, t)


_SINGLE = (UniformTime, LogitNormalTime)
_SHIFTED = (ShiftedTime, ResolutionShiftedTime)
_PAIRS = (TimePairSampler, ClampedPairSampler)


def valid_by_construction(sampler: object) -> bool:
    """Whether ``sampler`` is one of this module's samplers, all the way down.

    Their draws are finite, lie in ``[0, 1]`` and (for the pair samplers) satisfy
    ``r <= t`` by construction, so :class:`~mfcore.losses.MeanFlowLoss` decides once, when
    it is built, not to check them (no host sync); any other sampler's draw is checked at
    every call. A subclass is "any other": it may draw differently.
    """
    kind = type(sampler)
    if kind in _SINGLE:
        return True
    if kind in _SHIFTED:
        return valid_by_construction(sampler.base)  # type: ignore[attr-defined]
    if kind is GridPairSampler:
        return valid_by_construction(sampler.base)  # type: ignore[attr-defined]
    if kind in _PAIRS:
        second = sampler.r_sampler  # type: ignore[attr-defined]
        first_ok = valid_by_construction(sampler.t_sampler)  # type: ignore[attr-defined]
        return first_ok and (second is None or valid_by_construction(second))
    return False
