"""Toy metrics against known answers: closed-form W2, exact identities, hand-built samples."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import sqrtm
from scipy.stats import multivariate_normal

from mfcore.toys.gmm import GaussianMixture, preset
from mfcore.toys.metrics import evaluate, mmd, mode_precision, mode_recall, nll, w2

F64 = torch.float64
SETTINGS = settings(max_examples=20, deadline=None)


def _cloud(seed: int, n: int, d: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _gaussian_w2(m1, s1, m2, s2) -> float:
    """Closed-form W2 between N(m1, s1) and N(m2, s2) (Gelbrich / Dowson-Landau)."""
    root = sqrtm(sqrtm(s2) @ s1 @ sqrtm(s2)).real
    return math.sqrt(float(np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2.0 * root)))


# -------------------------------------------------------------------------------- W2
def test_w2_between_1d_gaussians():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1000, generator=gen, dtype=F64)
    b = 2.0 + 0.5 * torch.randn(1000, generator=gen, dtype=F64)
    assert abs(w2(a, b) - math.sqrt(2.0**2 + 0.5**2)) < 0.1


def test_w2_between_2d_gaussians():
    gen = torch.Generator().manual_seed(1)
    s1 = np.array([[1.0, -0.4], [-0.4, 0.6]])
    s2 = np.array([[0.3, 0.2], [0.2, 2.0]])
    m2 = np.array([0.5, -0.5])
    noise = torch.randn(2, 1000, 2, generator=gen, dtype=F64)
    a = noise[0] @ torch.from_numpy(np.linalg.cholesky(s1)).T
    b = torch.from_numpy(m2) + noise[1] @ torch.from_numpy(np.linalg.cholesky(s2)).T
    expected = _gaussian_w2(np.zeros(2), s1, m2, s2)  # 1.057
    assert abs(w2(a, b) - expected) < 0.12


@SETTINGS
@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), d=st.integers(1, 3))
def test_w2_is_the_best_permutation(seed, n, d):
    a, b = _cloud(seed, n, d), 2.0 * _cloud(seed + 1, n, d) + 0.5
    cost = torch.cdist(a, b).square()
    best = min(
        float(cost[torch.arange(n), torch.tensor(p)].mean())
        for p in itertools.permutations(range(n))
    )
    assert w2(a, b) == pytest.approx(math.sqrt(best), rel=1e-9)


@SETTINGS
@given(seed=st.integers(0, 2**16), n=st.integers(1, 60), d=st.integers(1, 4))
def test_w2_identities(seed, n, d):
    a = _cloud(seed, n, d)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    shift = _cloud(seed + 1, 1, d)
    assert w2(a, a) == 0.0
    assert w2(a, a[perm]) == pytest.approx(0.0, abs=1e-12)
    # a translation moves every point by the same vector: W2 is its length
    assert w2(a, a + shift) == pytest.approx(float(shift.norm()), rel=1e-9)


@SETTINGS
@given(seed=st.integers(0, 2**16), n=st.integers(1, 40), d=st.integers(1, 3))
def test_w2_is_a_metric(seed, n, d):
    a, b, c = _cloud(seed, n, d), 2.0 * _cloud(seed + 1, n, d), _cloud(seed + 2, n, d) + 1.0
    assert w2(a, b) == pytest.approx(w2(b, a), rel=1e-12)
    assert w2(a, c) <= w2(a, b) + w2(b, c) + 1e-12


@SETTINGS
@given(seed=st.integers(0, 2**16), n=st.integers(1, 50))
def test_w2_in_1d_is_the_sorted_matching(seed, n):
    a, b = _cloud(seed, n, 1), 3.0 * _cloud(seed + 1, n, 1)
    expected = math.sqrt(float((a.flatten().sort()[0] - b.flatten().sort()[0]).square().mean()))
    assert w2(a.flatten(), b.flatten()) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_w2_accepts_numpy_and_float32():
    a, b = _cloud(0, 30, 2), _cloud(1, 30, 2)
    assert w2(a.numpy(), b.float()) == pytest.approx(w2(a, b), rel=1e-6)


# ------------------------------------------------------------------------------- MMD
def _naive_mmd(a, b, bandwidths, unbiased):
    def k(x, y):
        d2 = (x[:, None, :] - y[None, :, :]).square().sum(-1)
        return torch.stack([torch.exp(-d2 / (2 * s * s)) for s in bandwidths]).mean(0)

    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    n, m = a.shape[0], b.shape[0]
    if unbiased:
        within_a = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
        within_b = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
        return float(within_a + within_b - 2 * kab.mean())
    return float(kaa.mean() + kbb.mean() - 2 * kab.mean())


@pytest.mark.parametrize("unbiased", [True, False])
def test_mmd_matches_the_definition_across_chunks(unbiased):
    a, b = _cloud(0, 700, 2), 0.8 * _cloud(1, 300, 2) + 0.2
    bandwidths = (0.3, 1.0)
    expected = _naive_mmd(a, b, bandwidths, unbiased)
    assert mmd(a, b, bandwidths, unbiased=unbiased) == pytest.approx(expected, rel=1e-10)


def test_mmd_of_a_cloud_with_itself():
    a = _cloud(2, 500, 2)
    assert mmd(a, a, unbiased=False) == pytest.approx(0.0, abs=1e-12)
    # the U-statistic drops the diagonal of k(a, a) only: it sits O(1/n) below zero
    assert -2.0 / 500 < mmd(a, a) <= 0.0


def test_mmd_separates_shifted_clouds():
    a, b = _cloud(3, 800, 2), _cloud(4, 800, 2)
    same = mmd(a, b)
    assert abs(same) < 3e-3
    small, large = mmd(a, b + 0.5), mmd(a, b + 2.0)
    assert small > 10 * abs(same)
    assert large > small
    assert mmd(b + 2.0, a) == pytest.approx(large, rel=1e-10)


@SETTINGS
@given(seed=st.integers(0, 2**16), n=st.integers(1, 30), m=st.integers(1, 30))
def test_biased_mmd_is_nonnegative(seed, n, m):
    assert mmd(_cloud(seed, n, 2), _cloud(seed + 1, m, 2) + 0.1, unbiased=False) >= -1e-12


# ------------------------------------------------------------------------------- NLL
def test_nll_matches_scipy_for_one_component():
    mean = np.array([0.5, -1.0, 2.0])
    cov = np.array([[1.0, 0.2, 0.0], [0.2, 0.5, 0.1], [0.0, 0.1, 2.0]])
    gmm = GaussianMixture(torch.from_numpy(mean)[None], torch.from_numpy(cov)[None])
    x = gmm.sample(300, generator=torch.Generator().manual_seed(0), dtype=F64)
    expected = -multivariate_normal(mean, cov).logpdf(x.numpy()).mean()
    assert nll(x, gmm) == pytest.approx(expected, rel=1e-10)
    assert nll(x.float(), gmm) == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------- mode precision / recall
RING = GaussianMixture.ring(8)


def test_all_samples_at_one_mode():
    x = RING.means[2].expand(100, 2) + 0.01 * _cloud(0, 100, 2)
    assert mode_precision(x, RING) == 1.0
    assert mode_recall(x, RING) == pytest.approx(1 / 8)


def test_samples_midway_between_modes():
    means = RING.means
    midpoints = 0.5 * (means + means.roll(1, dims=0))  # 5.4 stds from both neighbours
    x = midpoints.repeat(10, 1)
    assert mode_precision(x, RING) == 0.0
    assert mode_recall(x, RING) == 0.0


def test_recall_counts_each_modes_share():
    gmm = GaussianMixture.ring(4, weights=[0.1, 0.2, 0.3, 0.4])
    counts = [10, 20, 30, 40]  # n = 100, exactly the expected shares
    x = torch.cat([gmm.means[k].expand(c, 2) for k, c in enumerate(counts)])
    assert mode_recall(x, gmm) == 1.0
    counts = [4, 20, 30, 46]  # mode 0 gets 4 of its expected 10
    x = torch.cat([gmm.means[k].expand(c, 2) for k, c in enumerate(counts)])
    assert mode_recall(x, gmm) == 0.75
    assert mode_recall(x, gmm, share=0.4) == 1.0


def test_threshold_is_a_mahalanobis_radius():
    gmm = GaussianMixture(torch.zeros(1, 2), torch.tensor([[4.0, 0.25]]))  # stds 2 and 0.5
    inside = torch.tensor([[5.8, 0.0], [0.0, 1.45]])
    outside = torch.tensor([[6.2, 0.0], [0.0, 1.55]])
    assert mode_precision(inside, gmm) == 1.0
    assert mode_precision(outside, gmm) == 0.0
    assert mode_precision(outside, gmm, threshold=3.2) == 1.0
    assert mode_recall(outside, gmm) == 0.0


# --------------------------------------------------------------------------- evaluate
def test_evaluate_on_data_and_on_a_collapsed_sampler():
    gmm = preset("grid25")
    gen = torch.Generator().manual_seed(0)
    data, reference = gmm.sample(600, generator=gen), gmm.sample(600, generator=gen)
    good = evaluate(data, gmm, reference)
    assert set(good) == {"w2", "mmd", "nll", "mode_precision", "mode_recall"}
    assert all(isinstance(v, float) for v in good.values())
    assert good["mode_recall"] == 1.0 and good["mode_precision"] > 0.97
    assert abs(good["mmd"]) < 5e-3 and good["w2"] < 0.3
    assert good["nll"] == pytest.approx(nll(data, gmm))
    collapsed = gmm.means[12].expand(600, 2) + 0.1 * torch.randn(600, 2, generator=gen)
    bad = evaluate(collapsed, gmm, reference)
    assert bad["mode_recall"] == pytest.approx(1 / 25)
    assert bad["w2"] > 5 * good["w2"] and bad["mmd"] > 10 * abs(good["mmd"])


def test_evaluate_subsamples_w2_to_the_first_points():
    gmm = preset("ring8")
    gen = torch.Generator().manual_seed(1)
    x, y = gmm.sample(300, generator=gen), gmm.sample(300, generator=gen)
    assert evaluate(x, gmm, y, w2_points=100)["w2"] == pytest.approx(w2(x[:100], y[:100]))
    assert evaluate(x, gmm, y, w2_points=1000)["w2"] == pytest.approx(w2(x, y))


# ----------------------------------------------------------------------------- errors
A = torch.zeros(5, 2)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: w2(A, torch.zeros(6, 2)), ValueError, "same shape"),
        (lambda: w2(torch.zeros(5, 2, 1), A), ValueError, "a must have shape"),
        (lambda: w2(torch.zeros(0, 2), torch.zeros(0, 2)), ValueError, "N >= 1"),
        (lambda: w2([[0.0]], [[1.0]]), TypeError, "a must be a torch.Tensor"),
        (lambda: w2(A, torch.zeros(5, 2, dtype=torch.long)), TypeError, "b"),
        (lambda: w2(A, torch.full((5, 2), float("nan"))), ValueError, "finite"),
        (
            lambda: w2(torch.zeros(30, 2), torch.zeros(30, 2), max_points=20),
            ValueError,
            "max_points",
        ),
        (lambda: mmd(A, torch.zeros(5, 3)), ValueError, "3 columns|2 columns"),
        (lambda: mmd(A, A, ()), ValueError, "bandwidths"),
        (lambda: mmd(A, A, (1.0, -1.0)), ValueError, "bandwidths"),
        (lambda: mmd(A, A, "wide"), TypeError, "bandwidths"),
        (lambda: mmd(A[:1], A), ValueError, "at least 2"),
        (lambda: nll(A, "ring8"), TypeError, "gmm"),
        (lambda: nll(torch.zeros(5, 3), RING), ValueError, "columns"),
        (lambda: mode_precision(A, RING, threshold=0.0), ValueError, "threshold"),
        (lambda: mode_precision(A, RING, threshold="3"), TypeError, "threshold"),
        (lambda: mode_recall(A, RING, share=1.5), ValueError, "share"),
        (lambda: mode_recall(A, RING, share=0.0), ValueError, "share"),
        (lambda: evaluate(A, RING, torch.zeros(6, 2)), ValueError, "reference"),
        (lambda: evaluate(A, None, A), TypeError, "gmm"),
        (lambda: evaluate(A, RING, A, w2_points=0), ValueError, "w2_points"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
