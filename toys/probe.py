"""A fixed probe of a student's average velocity against the exact one, per gap bin.

The exact mixture stays the reference in every toy run, whatever the teacher: the probe
draws ``(z_t, r, t)`` once (``per_bin`` triples with ``t - r`` uniform in each gap bin, ``t``
uniform on ``[t - r, 1]``, ``z_t`` from the path) and integrates the exact velocity from
``t`` to ``r`` with a fine RK4 solve in float64, so ``u*(z_t, r, t) = (z_t - z_r) / (t - r)``
is exact to solver precision (the grid is denser near the data end, where the mixture's
field bends). A call returns the relative error ``||u - u*|| / ||u*||`` pooled over all
triples and per bin.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mfcore._checks import check_positive_int
from mfcore.solvers import odeint
from mfcore.warmup import DEFAULT_GAP_EDGES, gap_bin_names

from .gmm import GaussianMixture

__all__ = ["AverageVelocityProbe"]

_EXACT_STEPS = 256
_EXACT_SHIFT = 0.25  # steps denser near t = 0, where the field of a narrow mixture bends


class AverageVelocityProbe:
    """Relative error of a student's ``u(z_t, r, t)`` against the exact average velocity.

    Args:
        gmm: the mixture (its exact velocity is the reference).
        per_bin: triples per gap bin.
        edges: gap-bin edges ``0 = e_0 < ... < e_n = 1`` (bins ``(e_i, e_{i+1}]``).
        seed: seeds the draws.
    """

    def __init__(
        self,
        gmm: GaussianMixture,
        *,
        per_bin: int = 256,
        edges: tuple[float, ...] = DEFAULT_GAP_EDGES,
        seed: int = 0,
    ) -> None:
        check_positive_int("per_bin", per_bin)
        self.names = gap_bin_names(edges)
        gen = torch.Generator().manual_seed(seed + 30_000)
        lo = torch.tensor(edges[:-1], dtype=torch.float64).repeat_interleave(per_bin)
        hi = torch.tensor(edges[1:], dtype=torch.float64).repeat_interleave(per_bin)
        gap = lo + (hi - lo) * (1.0 - torch.rand(lo.shape, generator=gen, dtype=torch.float64))
        t = gap + (1.0 - gap) * torch.rand(gap.shape, generator=gen, dtype=torch.float64)
        t = torch.minimum(t, torch.ones_like(t))
        r = (t - gap).clamp_min(0.0)
        z = gmm.sample_marginal(t, generator=gen)
        self.z, self.r, self.t = z, r, t
        self.bin = torch.arange(len(self.names)).repeat_interleave(per_bin)
        self.exact = self.average_velocity(gmm.velocity)

    def average_velocity(self, v_fn) -> Tensor:
        """The average velocity of a velocity field over the probe's intervals (float64)."""
        z_r = odeint(
            lambda z, t: v_fn(z.to(self.z.dtype), t.to(self.z.dtype)).to(torch.float64),
            self.z,
            self.t,
            self.r,
            _EXACT_STEPS,
            method="rk4",
            shift=_EXACT_SHIFT,
        )
        return (self.z - z_r) / (self.t - self.r)[:, None]

    def errors(self, u: Tensor) -> dict[str, float]:
        """Relative errors of predictions ``u`` ``(N, D)`` (pooled and per bin)."""
        err = (u.detach().to(torch.float64) - self.exact).pow(2).sum(1)
        ref = self.exact.pow(2).sum(1)
        out = {"pooled": math.sqrt(float(err.sum() / ref.sum()))}
        for i, name in enumerate(self.names):
            m = self.bin == i
            out[name] = math.sqrt(float(err[m].sum() / ref[m].sum()))
        return out

    def __call__(self, student) -> dict[str, float]:
        """Relative errors of ``student(z, r, t)`` (evaluated in float32, without gradient)."""
        with torch.no_grad():
            u = student(self.z.float(), self.r.float(), self.t.float())
        return self.errors(u)
