"""Sample-quality metrics for the toys, measured against a known Gaussian mixture.

Each metric takes point clouds ``(N, D)`` as torch tensors (or numpy arrays; ``(N,)`` is read
as ``N`` points in 1-D), computes in float64 on the CPU, and returns a python float:

- :func:`w2`: exact Wasserstein-2 distance between two equal-size empirical measures;
- :func:`mmd`: squared maximum mean discrepancy with a mixture of RBF kernels;
- :func:`nll`: mean negative log-likelihood under the mixture's exact density;
- :func:`mode_precision` / :func:`mode_recall`: how many samples land on a mode, and how many
  modes get their share of samples;
- :func:`evaluate`: all five at once against a reference data sample.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from mfcore._checks import check_bandwidths, check_positive_int, check_tensor
from mfcore.toys.gmm import GaussianMixture

__all__ = ["W2_MAX_POINTS", "w2", "mmd", "nll", "mode_precision", "mode_recall", "evaluate"]

W2_MAX_POINTS = 2000
"""Largest cloud :func:`w2` accepts (the assignment problem costs O(N^3))."""

_DEFAULT_BANDWIDTHS = (0.1, 0.2, 0.5, 1.0, 2.0)
_KERNEL_CHUNK = 512
_SHARE_RTOL = 1e-9  # so that a count of exactly share * w_k * N passes despite rounding


def _as_points(name: str, x: object, dim: int | None = None) -> Tensor:
    """A finite float64 CPU tensor ``(N, D)`` from a tensor or array (``(N,)`` means D = 1)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    check_tensor(name, x)
    assert isinstance(x, Tensor)
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, D) or (N,) with N >= 1, got {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} columns to match the mixture, got {x.shape[1]}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite (got NaN or inf)")
    return x


def _check_gmm(gmm: object) -> GaussianMixture:
    if not isinstance(gmm, GaussianMixture):
        raise TypeError(f"gmm must be a GaussianMixture, got {type(gmm).__name__}")
    return gmm


def _check_positive(name: str, value: object, *, upper: float = math.inf) -> float:
    """Raise unless ``value`` is a real number in ``(0, upper]``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not 0.0 < value <= upper:
        raise ValueError(f"{name} must lie in (0, {upper}], got {value}")
    return float(value)


def w2(a: object, b: object, *, max_points: int = W2_MAX_POINTS) -> float:
    """Exact Wasserstein-2 distance between two empirical measures of equal size.

    ``W2(a, b)^2 = min_pi (1/N) sum_i |a_i - b_pi(i)|^2`` over permutations ``pi``, solved
    exactly with :func:`scipy.optimize.linear_sum_assignment` (an optimal coupling of two
    uniform measures on ``N`` points is a permutation: Birkhoff-von Neumann). This is the
    distance between the clouds themselves; as an estimate of the population distance it
    is biased upwards, so compare with the floor ``w2(data, fresh_data)``.

    Args:
        a: points ``(N, D)`` (or ``(N,)`` in 1-D).
        b: points of the same shape as ``a``.
        max_points: largest ``N`` accepted; above it this raises instead of subsampling, so
            the caller decides how (for i.i.d. samples, ``a[:2000]`` is an unbiased subsample).

    Returns:
        the distance, a float ``>= 0``.

    Raises:
        ValueError: shapes differ, ``N > max_points``, or a point is not finite.
    """
    a = _as_points("a", a)
    b = _as_points("b", b)
    if a.shape != b.shape:
        raise ValueError(
            f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] > max_points:
        raise ValueError(
            f"w2 solves an O(N^3) assignment and accepts at most max_points={max_points} points, "
            f"got {a.shape[0]}; subsample first"
        )
    # E|X - Y|^2 = |m_a - m_b|^2 + E|(X - m_a) - (Y - m_b)|^2 under every coupling, so
    # centring keeps the optimal permutation exact and makes the assignment much faster
    # for clouds that are far apart.
    mean_a, mean_b = a.mean(0), b.mean(0)
    centred_a, centred_b = a - mean_a, b - mean_b
    cost = torch.cdist(centred_a, centred_b, compute_mode="donot_use_mm_for_euclid_dist")
    cost = cost.square().numpy()
    rows, cols = linear_sum_assignment(cost)
    shift = float((mean_a - mean_b).square().sum())
    return math.sqrt(shift + max(float(cost[rows, cols].mean()), 0.0))


def _kernel_sum(a: Tensor, b: Tensor, bandwidths: Tensor) -> float:
    """``sum_ij k(a_i, b_j)`` with ``k = mean_s exp(-|x - y|^2 / (2 s^2))``, in row chunks."""
    total = 0.0
    scales = (-0.5 / bandwidths.square()).tolist()
    for start in range(0, a.shape[0], _KERNEL_CHUNK):
        block = a[start : start + _KERNEL_CHUNK]
        d2 = torch.cdist(block, b, compute_mode="donot_use_mm_for_euclid_dist").square()
        total += sum(float(torch.exp(d2 * scale).sum()) for scale in scales)
    return total / len(scales)


def mmd(
    a: object,
    b: object,
    bandwidths: object = _DEFAULT_BANDWIDTHS,
    *,
    unbiased: bool = True,
) -> float:
    """Squared maximum mean discrepancy with a mixture of RBF kernels.

    ``k(x, y) = (1/S) sum_s exp(-|x - y|^2 / (2 s^2))`` over the bandwidths ``s`` (so
    ``k(x, x) = 1``), and (Gretton et al., arXiv 0805.2368, eqs. 3 and 5)

    - unbiased (default): ``MMD_u^2 = sum_{i != j} k(a_i, a_j) / (n (n - 1))
      + sum_{i != j} k(b_i, b_j) / (m (m - 1)) - 2 sum_ij k(a_i, b_j) / (n m)``, whose
      expectation is zero for equal distributions (a single draw may be slightly negative);
    - biased: the same with the diagonals kept and ``n^2``, ``m^2``; never negative, zero
      when the clouds coincide.

    The default bandwidths suit data with unit variance per coordinate and modes of std
    0.1, like the presets of :mod:`mfcore.toys.gmm`.

    Args:
        a: points ``(n, D)`` (or ``(n,)``).
        b: points ``(m, D)``; ``m`` may differ from ``n``.
        bandwidths: kernel bandwidths, positive floats.
        unbiased: the U-statistic (needs ``n, m >= 2``) rather than the V-statistic.

    Returns:
        the squared discrepancy, a float.
    """
    a = _as_points("a", a)
    b = _as_points("b", b, a.shape[1])
    bw = torch.tensor(check_bandwidths(bandwidths), dtype=torch.float64)
    n, m = a.shape[0], b.shape[0]
    cross = _kernel_sum(a, b, bw) / (n * m)
    if not unbiased:
        return _kernel_sum(a, a, bw) / n**2 + _kernel_sum(b, b, bw) / m**2 - 2.0 * cross
    if min(n, m) < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 points in a and b, got {n} and {m}")
    within_a = (_kernel_sum(a, a, bw) - n) / (n * (n - 1))
    within_b = (_kernel_sum(b, b, bw) - m) / (m * (m - 1))
    return within_a + within_b - 2.0 * cross


def nll(x: object, gmm: GaussianMixture) -> float:
    """Mean negative log-likelihood ``-(1/N) sum_i log p(x_i)`` under the exact mixture density.

    Args:
        x: points ``(N, D)``.
        gmm: the data distribution.
    """
    gmm = _check_gmm(gmm)
    x = _as_points("x", x, gmm.dim)
    return float(-gmm.log_prob(x).mean())


def mode_precision(x: object, gmm: GaussianMixture, threshold: float = 3.0) -> float:
    """Fraction of samples within Mahalanobis distance ``threshold`` of some component.

    A sample ``x`` is on a mode when ``min_k |S_k^{-1/2} (x - mu_k)| <= threshold``. Exact
    samples from a 2-D mixture score ``P(chi2_2 <= 9) = 1 - exp(-4.5) ≈ 0.989`` at the
    default threshold (less for overlapping components' tails, never more).

    Args:
        x: samples ``(N, D)``.
        gmm: the mixture whose modes count.
        threshold: Mahalanobis radius of a mode, ``> 0``.
    """
    gmm = _check_gmm(gmm)
    threshold = _check_positive("threshold", threshold)
    _, distance = gmm.nearest_component(_as_points("x", x, gmm.dim))
    return float((distance <= threshold).double().mean())


def mode_recall(
    x: object, gmm: GaussianMixture, threshold: float = 3.0, share: float = 0.5
) -> float:
    """Fraction of components that receive at least ``share`` of their expected samples.

    Each sample within Mahalanobis distance ``threshold`` of some component is assigned to
    the nearest one (in Mahalanobis distance); component ``k`` is recalled when its count is
    at least ``share * w_k * N``. Samples off every mode are counted for nobody.

    Args:
        x: samples ``(N, D)``.
        gmm: the mixture whose modes count.
        threshold: Mahalanobis radius of a mode, ``> 0``.
        share: fraction of the expected count ``w_k N`` a mode needs, in ``(0, 1]``.
    """
    gmm = _check_gmm(gmm)
    threshold = _check_positive("threshold", threshold)
    share = _check_positive("share", share, upper=1.0)
    x = _as_points("x", x, gmm.dim)
    index, distance = gmm.nearest_component(x)
    counts = torch.bincount(index[distance <= threshold], minlength=gmm.num_components)
    expected = share * gmm.weights * x.shape[0]
    recalled = counts >= expected * (1.0 - _SHARE_RTOL)
    return float(recalled.double().mean())


def evaluate(
    samples: object,
    gmm: GaussianMixture,
    reference: object,
    *,
    w2_points: int = W2_MAX_POINTS,
) -> dict[str, float]:
    """All toy metrics of ``samples`` against a mixture and a fresh data sample.

    ``w2`` uses the first ``min(N, w2_points)`` points of each cloud (an unbiased subsample
    of i.i.d. draws; see :func:`w2`); ``mmd`` is the unbiased estimate over all points.
    The exact assignment behind ``w2`` costs O(N^3): about a second for 1000 points near
    the data, up to ten times that for 2000 points of a collapsed sampler.

    Args:
        samples: generated points ``(N, D)``.
        gmm: the data distribution.
        reference: a fresh sample of the data, same shape as ``samples``.
        w2_points: how many points :func:`w2` uses, at most :data:`W2_MAX_POINTS`.

    Returns:
        ``{"w2", "mmd", "nll", "mode_precision", "mode_recall"}`` as floats.
    """
    gmm = _check_gmm(gmm)
    samples = _as_points("samples", samples, gmm.dim)
    reference = _as_points("reference", reference, gmm.dim)
    if samples.shape != reference.shape:
        raise ValueError(
            f"reference must have the shape of samples {tuple(samples.shape)}, "
            f"got {tuple(reference.shape)}"
        )
    check_positive_int("w2_points", w2_points)
    head = min(samples.shape[0], w2_points)
    return {
        "w2": w2(samples[:head], reference[:head]),
        "mmd": mmd(samples, reference),
        "nll": nll(samples, gmm),
        "mode_precision": mode_precision(samples, gmm),
        "mode_recall": mode_recall(samples, gmm),
    }
