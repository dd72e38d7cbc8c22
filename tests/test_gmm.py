"""The Gaussian mixture's exact velocity and densities, checked against independent answers.

Independent means: quadrature over x, self-normalised Monte Carlo over (x, eps), Gaussian
conditioning written with ``torch.linalg.solve``, scipy's densities, the score identity
``v = -(z + t grad log p_t(z)) / (1 - t)``, and integrating the ODE back to the data.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from mfcore.fields import VelocityField
from mfcore.solvers import sample_teacher
from mfcore.toys.gmm import GaussianMixture, preset, presets
from mfcore.toys.metrics import mode_precision, mode_recall, w2

F64 = torch.float64
SETTINGS = settings(max_examples=20, deadline=None)
EDGE_TIMES = (0.0, 1e-7, 1.0 - 1e-7, 1.0)


def _random_gmm(seed: int, k: int, d: int, *, min_var: float = 0.05) -> GaussianMixture:
    """A mixture with full covariances ``A A^T / d + min_var I`` and random weights."""
    gen = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(k, d, generator=gen, dtype=F64)
    a = 0.6 * torch.randn(k, d, d, generator=gen, dtype=F64)
    covs = a @ a.transpose(-1, -2) / d + min_var * torch.eye(d, dtype=F64)
    weights = torch.rand(k, generator=gen, dtype=F64) + 0.2
    return GaussianMixture(means, covs, weights / weights.sum())


def _times(t: float, n: int, dtype=F64) -> torch.Tensor:
    return torch.full((n,), t, dtype=dtype)


# ------------------------------------------------------------------ velocity: closed forms
def _single_gaussian_velocity(mu, cov, z, t):
    """``E[eps - x | z_t]`` for one Gaussian by joint-Gaussian conditioning with a solve."""
    a, b = 1.0 - t, t
    eye = torch.eye(mu.shape[0], dtype=F64)
    c = a * a * cov + b * b * eye
    gain = (b * eye - a * cov) @ torch.linalg.inv(c)
    return -mu + (z - a * mu) @ gain.T


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    d=st.integers(1, 4),
    t=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
)
def test_single_gaussian_matches_conditioning(seed, d, t):
    gmm = _random_gmm(seed, 1, d)
    z = 3.0 * torch.randn(6, d, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    expected = _single_gaussian_velocity(gmm.means[0], gmm.covs[0], z, t)
    got = gmm.velocity(z, _times(t, 6))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_endpoints_have_closed_forms():
    gmm = _random_gmm(3, 4, 3)
    z = torch.randn(10, 3, dtype=F64)
    torch.testing.assert_close(gmm.velocity(z, _times(0.0, 10)), -z, rtol=0, atol=1e-12)
    expected = z - gmm.weights @ gmm.means
    torch.testing.assert_close(gmm.velocity(z, _times(1.0, 10)), expected, rtol=0, atol=1e-12)


@SETTINGS
@given(
    k=st.integers(1, 3),
    means=st.lists(st.floats(-2.0, 2.0), min_size=3, max_size=3),
    stds=st.lists(st.floats(0.05, 1.0), min_size=3, max_size=3),
    t=st.floats(0.02, 0.98),
    z=st.floats(-3.0, 3.0),
)
def test_velocity_and_density_match_quadrature_in_1d(k, means, stds, t, z):
    weights = torch.arange(1, k + 1, dtype=F64)
    gmm = GaussianMixture.isotropic(
        torch.tensor(means[:k], dtype=F64)[:, None], stds[:k], weights / weights.sum()
    )
    x = torch.linspace(-8.0, 8.0, 200_001, dtype=F64)[:, None]  # spacing 8e-5
    h = 16.0 / 200_000
    eps = (z - (1.0 - t) * x) / t
    log_lik = -0.5 * eps.square().sum(-1) - math.log(t) - 0.5 * math.log(2 * math.pi)
    log_joint = gmm.log_prob(x) + log_lik
    posterior = torch.softmax(log_joint, 0)
    expected_v = (posterior[:, None] * (eps - x)).sum(0)
    expected_logp = torch.logsumexp(log_joint, 0) + math.log(h)
    zz = torch.tensor([[z]], dtype=F64)
    torch.testing.assert_close(gmm.velocity(zz, _times(t, 1))[0], expected_v, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(
        gmm.marginal_log_prob(zz, _times(t, 1))[0], expected_logp, rtol=0, atol=1e-7
    )


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 4), d=st.integers(1, 3), t=st.floats(0.3, 1.0))
def test_velocity_matches_self_normalised_monte_carlo(seed, k, d, t):
    gmm = _random_gmm(seed, k, d, min_var=0.2)
    gen = torch.Generator().manual_seed(seed + 7)
    z = gmm.sample_marginal(_times(t, 1), generator=gen)
    x = gmm.sample(100_000, generator=gen, dtype=F64)
    eps = (z - (1.0 - t) * x) / t  # the noise that puts x at z
    w = torch.softmax(-0.5 * eps.square().sum(-1), 0)  # p(z | x) up to a constant in x
    assume(float(1.0 / w.square().sum()) > 200.0)  # effective sample size
    f = eps - x
    estimate = (w[:, None] * f).sum(0)
    stderr = (w[:, None].square() * (f - estimate).square()).sum(0).sqrt()
    error = (gmm.velocity(z, _times(t, 1))[0] - estimate).abs()
    assert bool((error <= 6.0 * stderr + 1e-9).all()), (error, stderr)


@SETTINGS
@given(
    seed=st.integers(0, 2**16), k=st.integers(1, 4), d=st.integers(1, 3), t=st.floats(0.01, 0.99)
)
def test_velocity_matches_score_identity(seed, k, d, t):
    # E[eps | z] = -t s and E[x | z] = (z + t^2 s) / (1 - t) give v = -(z + t s) / (1 - t).
    gmm = _random_gmm(seed, k, d)
    z = gmm.sample_marginal(_times(t, 8), generator=torch.Generator().manual_seed(seed))
    z.requires_grad_(True)
    score = torch.autograd.grad(gmm.marginal_log_prob(z, _times(t, 8)).sum(), z)[0]
    expected = -(z.detach() + t * score) / (1.0 - t)
    torch.testing.assert_close(
        gmm.velocity(z.detach(), _times(t, 8)), expected, rtol=1e-8, atol=1e-8
    )


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16), k=st.integers(1, 6), d=st.integers(1, 3), std=st.floats(0.05, 2.0)
)
def test_shared_variance_velocity_equals_the_general_form(seed, k, d, std):
    gen = torch.Generator().manual_seed(seed)
    gmm = GaussianMixture.isotropic(torch.randn(k, d, generator=gen, dtype=F64), std)
    assert gmm._shared_var == pytest.approx(std * std)
    general = GaussianMixture.isotropic(gmm.means, std)
    general._shared_var = None  # the eigenbasis route every mixture can take
    z = 3.0 * torch.randn(64, d, generator=gen, dtype=F64)
    t = torch.rand(64, generator=gen, dtype=F64)
    t[:3] = torch.tensor([0.0, 1.0, 1e-9], dtype=F64)
    torch.testing.assert_close(gmm.velocity(z, t), general.velocity(z, t), rtol=1e-10, atol=1e-12)
    assert GaussianMixture.anisotropic3d()._shared_var is None


def test_covariance_forms_agree():
    means = torch.tensor([[0.0, 1.0], [1.0, -1.0], [-1.0, 0.5]], dtype=F64)
    var = torch.tensor([0.3, 0.5, 0.2], dtype=F64)
    forms = [
        GaussianMixture(means, var),
        GaussianMixture(means, var[:, None].expand(3, 2)),
        GaussianMixture(means, var[:, None, None] * torch.eye(2, dtype=F64)),
        GaussianMixture.isotropic(means, var.sqrt()),
        GaussianMixture(means.numpy(), var.tolist()),
    ]
    z = torch.randn(16, 2, dtype=F64)
    t = torch.rand(16, dtype=F64)
    for gmm in forms[1:]:
        torch.testing.assert_close(gmm.velocity(z, t), forms[0].velocity(z, t))
        torch.testing.assert_close(gmm.covs, forms[0].covs)


def test_velocity_is_a_differentiable_velocity_field():
    gmm = preset("ring8")
    assert isinstance(gmm, VelocityField)
    gen = torch.Generator().manual_seed(0)  # a fixed draw: the difference's error is draw-bound
    z = torch.randn(5, 2, dtype=F64, generator=gen)
    t = torch.rand(5, dtype=F64, generator=gen)
    torch.testing.assert_close(gmm(z, t), gmm.velocity(z, t))
    tangent = torch.randn(5, 2, dtype=F64, generator=gen)
    _, jvp = torch.func.jvp(lambda zz: gmm.velocity(zz, t), (z,), (tangent,))
    h = 1e-6
    fd = (gmm.velocity(z + h * tangent, t) - gmm.velocity(z - h * tangent, t)) / (2 * h)
    torch.testing.assert_close(jvp, fd, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------- finiteness
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t", EDGE_TIMES)
@pytest.mark.parametrize("name", ["ring8", "grid25_unequal", "random"])
def test_finite_at_the_ends_of_time(dtype, t, name):
    gmm = _random_gmm(0, 5, 2, min_var=1e-3) if name == "random" else preset(name)
    z = torch.cat([torch.randn(64, 2), torch.tensor([[30.0, -30.0], [0.0, 0.0], [1e3, 1e3]])]).to(
        dtype
    )
    tt = _times(t, z.shape[0], dtype)
    for out in (gmm.velocity(z, tt), gmm.marginal_log_prob(z, tt), gmm.responsibilities(z, tt)):
        assert out.dtype == dtype
        assert bool(torch.isfinite(out).all())
    # accuracy where data and noise live (far out, fp32 cannot resolve the posteriors)
    typical, t_typical = z[:64], tt[:64]
    ref = gmm.velocity(typical.double(), t_typical.double())
    error = (gmm.velocity(typical, t_typical).double() - ref).abs() / ref.abs().clamp_min(1.0)
    assert float(error.max()) < 1e-4


def test_low_precision_input_keeps_its_dtype():
    gmm = preset("ring8")
    z = torch.randn(4, 2, dtype=torch.bfloat16)
    out = gmm.velocity(z, torch.rand(4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert bool(torch.isfinite(out).all())


# ---------------------------------------------------------------------------- densities
def test_log_prob_matches_scipy():
    gmm = _random_gmm(11, 3, 3)
    x = gmm.sample(50, generator=torch.Generator().manual_seed(0), dtype=F64)
    per_component = np.stack(
        [
            multivariate_normal(m.numpy(), c.numpy()).logpdf(x.numpy())
            for m, c in zip(gmm.means, gmm.covs, strict=True)
        ],
        axis=-1,
    )
    expected = logsumexp(per_component + np.log(gmm.weights.numpy()), axis=-1)
    np.testing.assert_allclose(gmm.log_prob(x).numpy(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t", [0.0, 0.05, 0.5, 1.0])
def test_marginal_density_integrates_to_one(t):
    gmm = preset("ring8_unequal")
    axis = torch.linspace(-6.0, 6.0, 401, dtype=F64)  # spacing 0.03, under a third of a std
    grid = torch.cartesian_prod(axis, axis)
    logp = gmm.marginal_log_prob(grid, _times(t, grid.shape[0]))
    mass = float(torch.logsumexp(logp, 0).exp()) * 0.03**2
    assert abs(mass - 1.0) < 1e-7


def test_marginal_density_at_the_ends():
    gmm = _random_gmm(5, 4, 3)
    z = 2.0 * torch.randn(20, 3, dtype=F64)
    torch.testing.assert_close(gmm.marginal_log_prob(z, _times(0.0, 20)), gmm.log_prob(z))
    standard = -0.5 * z.square().sum(-1) - 1.5 * math.log(2 * math.pi)
    torch.testing.assert_close(gmm.marginal_log_prob(z, _times(1.0, 20)), standard)


def test_responsibilities_are_posteriors():
    gmm = _random_gmm(2, 3, 2)
    z = torch.randn(10, 2, dtype=F64)
    t = torch.rand(10, dtype=F64)
    gamma = gmm.responsibilities(z, t)
    torch.testing.assert_close(gamma.sum(-1), torch.ones(10, dtype=F64))
    torch.testing.assert_close(gmm.responsibilities(z, _times(1.0, 10))[0], gmm.weights)


# ------------------------------------------------------------------------------ sampling
def test_sample_moments_and_component_frequencies():
    gmm = _random_gmm(4, 3, 2)
    n = 200_000
    x, labels = gmm.sample(
        n, generator=torch.Generator().manual_seed(1), dtype=F64, return_labels=True
    )
    mean, cov = gmm.moments()
    stderr = (torch.diagonal(cov) / n).sqrt()
    assert bool(((x.mean(0) - mean).abs() < 5 * stderr).all())
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0.03, atol=0.03)
    freq = torch.bincount(labels, minlength=3).double() / n
    w = gmm.weights
    assert bool(((freq - w).abs() < 5 * (w * (1 - w) / n).sqrt()).all())
    for k in range(3):  # each component's own mean
        torch.testing.assert_close(x[labels == k].mean(0), gmm.means[k], rtol=0, atol=0.02)


def test_sample_reproducible_dtype_and_device():
    gmm = preset("grid25")
    a = gmm.sample(100, generator=torch.Generator().manual_seed(3))
    b = gmm.sample(100, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert a.shape == (100, 2) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert b.dtype == F64
    torch.testing.assert_close(a, b.float())


def test_sample_marginal_moments():
    gmm = _random_gmm(8, 2, 2)
    t = 0.6
    z = gmm.sample_marginal(_times(t, 200_000), generator=torch.Generator().manual_seed(2))
    mean, cov = gmm.moments()
    assert z.dtype == F64
    torch.testing.assert_close(z.mean(0), (1 - t) * mean, rtol=0, atol=0.01)
    expected_cov = (1 - t) ** 2 * cov + t**2 * torch.eye(2, dtype=F64)
    torch.testing.assert_close(torch.cov(z.T), expected_cov, rtol=0.03, atol=0.01)


def test_mahalanobis_and_nearest_component():
    gmm = GaussianMixture(
        torch.tensor([[0.0, 0.0], [5.0, 0.0]]), torch.tensor([[4.0, 1.0], [1.0, 1.0]])
    )
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [4.0, 0.0]], dtype=F64)
    expected = torch.tensor([[1.0, 3.0], [3.0, math.hypot(5.0, 3.0)], [2.0, 1.0]], dtype=F64)
    torch.testing.assert_close(gmm.mahalanobis(x), expected)
    index, distance = gmm.nearest_component(x)
    assert index.tolist() == [0, 0, 1]
    torch.testing.assert_close(distance, torch.tensor([1.0, 3.0, 1.0], dtype=F64))


# ------------------------------------------------------------------ back to the data (ODE)
@pytest.mark.parametrize("name", ["ring8_unequal", "grid25"])
def test_integrating_the_exact_velocity_recovers_the_data(name):
    gmm = preset(name)
    gen = torch.Generator().manual_seed(0)
    n = 1000
    noise = torch.randn(n, 2, generator=gen, dtype=F64)
    samples = sample_teacher(gmm, noise, steps=64, method="rk4")
    data, fresh = gmm.sample(n, generator=gen, dtype=F64), gmm.sample(n, generator=gen, dtype=F64)
    floor = w2(data, fresh)
    assert w2(samples, data) < floor + 0.05
    assert mode_recall(samples, gmm) == 1.0
    assert mode_precision(samples, gmm) > 0.97
    index, _ = gmm.nearest_component(samples)
    freq = torch.bincount(index, minlength=gmm.num_components).double() / n
    w = gmm.weights
    assert bool(((freq - w).abs() < 5 * (w * (1 - w) / n).sqrt()).all())


# ------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", sorted(set(presets) - {"aniso3d"}))
def test_presets_are_scaled_like_normalised_data(name):
    gmm = preset(name)
    mean, cov = gmm.moments()
    assert gmm.dim == 2
    assert gmm.num_components == (8 if name.startswith("ring") else 25)
    if name.endswith("_unequal"):
        w = gmm.weights
        assert math.isclose(float(w.max() / w.min()), 4.0, rel_tol=1e-12)
        assert float(mean.abs().max()) < 0.4
        assert bool(((torch.diagonal(cov) - 1.0).abs() < 0.15).all())
    else:
        torch.testing.assert_close(
            gmm.weights, torch.full_like(gmm.weights, 1 / gmm.num_components)
        )
        torch.testing.assert_close(mean, torch.zeros(2, dtype=F64), rtol=0, atol=1e-12)
        torch.testing.assert_close(cov, torch.eye(2, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        gmm.covs, 0.01 * torch.eye(2, dtype=F64).expand(gmm.num_components, 2, 2)
    )


def test_preset_geometry():
    ring = GaussianMixture.ring(4, radius=2.0, std=0.5)
    expected = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0]], dtype=F64)
    torch.testing.assert_close(ring.means, expected, rtol=0, atol=1e-12)
    grid = GaussianMixture.grid(2, spacing=1.0, weights=[0.1, 0.2, 0.3, 0.4])
    expected = torch.tensor([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]], dtype=F64)
    torch.testing.assert_close(grid.means, expected)
    torch.testing.assert_close(grid.weights, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64))
    assert GaussianMixture.grid(1).means.abs().max() == 0


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="ring8.*grid25_unequal|grid25_unequal.*ring8"):
        preset("ring9")


# -------------------------------------------------------------------------------- errors
MEANS = torch.zeros(2, 2, dtype=F64)


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: GaussianMixture(torch.zeros(2), torch.ones(2)), ValueError, "means"),
        (lambda: GaussianMixture(torch.zeros(0, 2), torch.ones(0)), ValueError, "means"),
        (lambda: GaussianMixture("abc", torch.ones(2)), TypeError, "means"),
        (
            lambda: GaussianMixture(torch.tensor([[0.0, float("nan")]]), torch.ones(1)),
            ValueError,
            "means",
        ),
        (lambda: GaussianMixture(MEANS, torch.ones(3)), ValueError, "covs"),
        (lambda: GaussianMixture(MEANS, torch.ones(2, 2, 3)), ValueError, "covs"),
        (
            lambda: GaussianMixture(MEANS, torch.tensor([1.0, -1.0])),
            ValueError,
            "positive definite",
        ),
        (
            lambda: GaussianMixture(MEANS, torch.tensor([[1.0, 0.0], [1.0, 1.0]]).expand(2, 2, 2)),
            ValueError,
            "symmetric",
        ),
        (
            lambda: GaussianMixture(MEANS, torch.tensor([[1.0, 2.0], [2.0, 1.0]]).expand(2, 2, 2)),
            ValueError,
            "positive definite",
        ),
        (lambda: GaussianMixture(MEANS, torch.ones(2, dtype=torch.complex64)), TypeError, "covs"),
        (lambda: GaussianMixture(MEANS, torch.ones(2), [0.5, 0.6]), ValueError, "sum to 1"),
        (lambda: GaussianMixture(MEANS, torch.ones(2), [1.5, -0.5]), ValueError, "positive"),
        (lambda: GaussianMixture(MEANS, torch.ones(2), [1.0]), ValueError, "weights"),
        (lambda: GaussianMixture.isotropic(MEANS, [0.1, 0.1, 0.1]), ValueError, "std"),
        (lambda: GaussianMixture.isotropic(MEANS, 0.0), ValueError, "std"),
        (lambda: GaussianMixture.ring(0), ValueError, "n"),
        (lambda: GaussianMixture.ring(8, std=-1.0), ValueError, "std"),
        (lambda: GaussianMixture.ring(8, std=1.5), ValueError, "radius"),
        (lambda: GaussianMixture.ring(8, std="a"), TypeError, "std"),
        (lambda: GaussianMixture.grid(2.5), TypeError, "n"),
        (lambda: GaussianMixture.ring(2, weights=[0.5, 0.5], unequal=True), ValueError, "unequal"),
    ],
)
def test_construction_errors(build, error, match):
    with pytest.raises(error, match=match):
        build()


GMM = GaussianMixture(MEANS, torch.ones(2))
Z = torch.zeros(3, 2)
T = torch.full((3,), 0.5)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: GMM.velocity(torch.zeros(3, 3), T), ValueError, "z must have shape"),
        (lambda: GMM.velocity(torch.zeros(3), T), ValueError, "z must have shape"),
        (lambda: GMM.velocity(torch.zeros(3, 2, dtype=torch.long), T), TypeError, "z"),
        (lambda: GMM.velocity([[0.0, 0.0]], T), TypeError, "z"),
        (lambda: GMM.velocity(torch.full((3, 2), float("nan")), T), ValueError, "finite"),
        (lambda: GMM.velocity(Z, torch.full((4,), 0.5)), ValueError, "t must have shape"),
        (lambda: GMM.velocity(Z, torch.full((3, 1), 0.5)), ValueError, "t must have shape"),
        (lambda: GMM.velocity(Z, torch.full((3,), 1.5)), ValueError, r"\[0, 1\]"),
        (lambda: GMM.velocity(Z, torch.tensor(0.5)), ValueError, "t must have shape"),
        (lambda: GMM.velocity(Z, T, label=1), TypeError, "unconditional"),
        (lambda: GMM.marginal_log_prob(Z, torch.full((3,), -0.1)), ValueError, r"\[0, 1\]"),
        (lambda: GMM.responsibilities(Z[:, :1], T), ValueError, "z must have shape"),
        (lambda: GMM.log_prob(torch.zeros(3, 5)), ValueError, "x must have shape"),
        (lambda: GMM.mahalanobis(torch.zeros(3)), ValueError, "x must have shape"),
        (lambda: GMM.sample(0), ValueError, "n"),
        (lambda: GMM.sample(2.0), TypeError, "n"),
        (lambda: GMM.sample(2, dtype=torch.long), TypeError, "dtype"),
        (lambda: GMM.sample_marginal(torch.full((2,), 2.0)), ValueError, "t"),
    ],
)
def test_call_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    gmm = preset("grid25_unequal")
    z = torch.randn(256, 2)
    t = torch.rand(256)
    for dtype in (torch.float32, torch.float64):
        cpu = gmm.velocity(z.to(dtype), t.to(dtype))
        gpu = gmm.velocity(z.to("cuda", dtype), t.to("cuda", dtype))
        assert gpu.device.type == "cuda" and gpu.dtype == dtype
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
    x = gmm.sample(10, generator=torch.Generator("cuda").manual_seed(0))
    assert x.device.type == "cuda"
