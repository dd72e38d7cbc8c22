"""Random draws for part of a batch: the rows one process (or micro-batch) computes.

A data-parallel run splits a global batch of ``total`` samples over processes and
micro-batches. If each part drew its noise for its own rows from a shared generator, the
parts would see other numbers than one process drawing for the whole batch, and a run
would depend on its world size. With a :class:`BatchRows` in place of a generator, every
draw is the whole batch's (from the shared generator, which so advances as it would in one
process) and the part keeps its rows: the run computes what one process computes for the
global batch, at any world size.

:func:`draw_normal` and :func:`draw_uniform` take either a :class:`BatchRows` or a plain
``torch.Generator`` (or ``None``), which draws for the given shape as ``torch.randn`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mfcore._checks import check_instance, check_positive_int

__all__ = ["BatchRows", "draw_normal", "draw_uniform"]


@dataclass(frozen=True)
class BatchRows:
    """Rows ``[start, stop)`` of a global batch of ``total`` samples, drawn from ``generator``.

    Attributes:
        generator: the generator the whole batch's draws come from (the same state on every
            process).
        start: first global row of this part.
        stop: one past its last row (``start < stop <= total``).
        total: the global batch size.
    """

    generator: torch.Generator
    start: int
    stop: int
    total: int

    def __post_init__(self) -> None:
        check_instance("generator", self.generator, torch.Generator, "a torch.Generator")
        check_positive_int("start", self.start, minimum=0)
        check_positive_int("stop", self.stop, minimum=self.start + 1)
        check_positive_int("total", self.total, minimum=self.stop)

    @property
    def rows(self) -> int:
        """How many rows this part holds."""
        return self.stop - self.start


Draws = torch.Generator | BatchRows | None


def _draw(
    fn: Callable[..., Tensor],
    shape: Sequence[int],
    generator: Draws,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> Tensor:
    shape = tuple(shape)
    if not isinstance(generator, BatchRows):
        return fn(shape, generator=generator, device=device, dtype=dtype)
    if not shape or shape[0] != generator.rows:
        raise ValueError(f"shape {shape} must have the {generator.rows} rows of {generator}")
    whole = fn(
        (generator.total, *shape[1:]), generator=generator.generator, device=device, dtype=dtype
    )
    return whole[generator.start : generator.stop]


def draw_normal(
    shape: Sequence[int],
    generator: Draws,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard normal draws of ``shape`` (``(B, ...)`` for :class:`BatchRows`, ``B`` its rows)."""
    return _draw(torch.randn, shape, generator, device, dtype)


def draw_uniform(
    shape: Sequence[int],
    generator: Draws,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``U[0, 1)`` draws of ``shape`` (``(B, ...)`` for :class:`BatchRows`, ``B`` its rows)."""
    return _draw(torch.rand, shape, generator, device, dtype)
