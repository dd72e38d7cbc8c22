"""Gaussian mixtures with an exact flow-matching velocity: the toys' reference teacher.

On the path ``z_t = (1 - t) x + t eps`` (rectified flow, Liu et al., arXiv 2209.03003;
flow matching, Lipman et al., arXiv 2210.02747) with ``x ~ sum_k w_k N(mu_k, S_k)`` and
``eps ~ N(0, I)``, every quantity a flow-matching or MeanFlow (arXiv 2505.13447) method
learns has a closed form. Given component ``k``, with ``a = 1 - t`` and ``b = t``,

    z_t | k ~ N(a mu_k, C_k(t)),   C_k(t) = a^2 S_k + b^2 I,

and ``(x, eps, z_t)`` are jointly Gaussian, so Gaussian conditioning (Bishop, PRML, sec. 2.3.1)
gives the conditional velocity, linear in ``z``:

    E[eps - x | z_t = z, k] = -mu_k + (b I - a S_k) C_k(t)^{-1} (z - a mu_k).

The marginal velocity ``v(z, t) = E[eps - x | z_t = z]`` averages these with the component
posteriors ``gamma_k(z, t) ∝ w_k N(z; a mu_k, C_k(t))``. With ``S_k = U_k diag(l_k) U_k^T``,
``C_k(t) = U_k diag(a^2 l_k + b^2) U_k^T`` and ``a^2 l + b^2 >= l / (1 + l) > 0`` on the
whole of ``[0, 1]``, so nothing is singular at ``t = 0`` (where ``v = -z``) or ``t = 1``
(where ``v = z - sum_k w_k mu_k``).

Parameters are stored in float64; methods compute in ``mfcore._checks.compute_dtype`` of
their input (fp32 at least, fp64 stays fp64) on the input's device, and return the input's
dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from mfcore._checks import check_choice, check_positive_int, check_tensor, check_time
from mfcore.path import compute_dtype

__all__ = ["GaussianMixture", "presets", "preset"]

_DEFAULT_STD = 0.1
_UNEQUAL_RATIO = 4.0  # heaviest / lightest component weight in the "unequal" presets
_SYMMETRY_TOL = 1e-10
_EIGEN_TOL = 1e-12
_WEIGHT_SUM_TOL = 1e-6


@dataclass(frozen=True)
class _Params:
    """The mixture's parameters in one dtype on one device."""

    means: Tensor  # (K, D)
    evecs: Tensor  # (K, D, D), columns are eigenvectors of S_k
    evals: Tensor  # (K, D), eigenvalues of S_k
    log_weights: Tensor  # (K,)
    weights: Tensor  # (K,)


def _as_float64(name: str, value: object) -> Tensor:
    """Convert a tensor, array or nested sequence of reals to a float64 CPU tensor."""
    if isinstance(value, Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got dtype {value.dtype}")
        return value.detach().to(device="cpu", dtype=torch.float64)
    try:
        out = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"{name} must be a tensor or array of reals, got {type(value).__name__}"
        ) from err
    return out


def _check_finite_param(name: str, x: Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite")


def _check_means(means: object) -> Tensor:
    m = _as_float64("means", means)
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"means must have shape (K, D) with K, D >= 1, got {tuple(m.shape)}")
    _check_finite_param("means", m)
    return m


def _full_covariances(covs: object, k: int, d: int) -> Tensor:
    """Expand ``covs`` given as (K, D, D), (K, D) or (K,) covariances to (K, D, D)."""
    c = _as_float64("covs", covs)
    _check_finite_param("covs", c)
    eye = torch.eye(d, dtype=torch.float64)
    if c.shape == (k, d, d):
        scale = max(1.0, float(c.abs().max()))
        if float((c - c.transpose(-1, -2)).abs().max()) > _SYMMETRY_TOL * scale:
            raise ValueError("covs of shape (K, D, D) must be symmetric")
        return 0.5 * (c + c.transpose(-1, -2))
    if c.shape == (k, d):
        return torch.diag_embed(c)
    if c.shape == (k,):
        return c[:, None, None] * eye
    raise ValueError(
        f"covs must have shape (K, D, D) = {(k, d, d)} (full), (K, D) = {(k, d)} (diagonal "
        f"variances) or (K,) = {(k,)} (isotropic variances); got {tuple(c.shape)}"
    )


def _eigen(covs: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition ``S_k = U_k diag(l_k) U_k^T``; raise unless every ``S_k`` is PD."""
    evals, evecs = torch.linalg.eigh(covs)
    floor = _EIGEN_TOL * evals.abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
    bad = (evals <= floor).any(dim=-1)
    if bool(bad.any()):
        which = bad.nonzero().flatten().tolist()
        raise ValueError(f"covs must be positive definite; components {which} are not")
    return evals, evecs


def _check_weights(weights: object, k: int) -> Tensor:
    if weights is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    w = _as_float64("weights", weights)
    if w.shape != (k,):
        raise ValueError(f"weights must have shape (K,) = {(k,)}, got {tuple(w.shape)}")
    _check_finite_param("weights", w)
    if bool((w <= 0).any()):
        raise ValueError("weights must be strictly positive")
    total = float(w.sum())
    if abs(total - 1.0) > _WEIGHT_SUM_TOL:
        raise ValueError(f"weights must sum to 1, got sum {total:.8g}")
    return w / w.sum()


def _check_points(name: str, z: object, dim: int) -> Tensor:
    """Raise unless ``z`` is a finite floating tensor of shape ``(B, dim)``."""
    check_tensor(name, z)
    assert isinstance(z, Tensor)
    if z.ndim != 2 or z.shape[1] != dim:
        raise ValueError(f"{name} must have shape (B, {dim}), got {tuple(z.shape)}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError(f"{name} must be finite (got NaN or inf)")
    return z


def _path_coefficients(t: Tensor) -> tuple[Tensor, Tensor]:
    """``a = 1 - t`` and ``b = t`` shaped ``(B, 1, 1)`` to broadcast over ``(B, K, D)``."""
    t = t[:, None, None]
    return 1.0 - t, t


def _whiten(z: Tensor, p: _Params, a: Tensor) -> Tensor:
    """Coordinates ``y = U_k^T (z - a mu_k)`` in each eigenbasis: ``(B, D) -> (B, K, D)``."""
    return torch.einsum("kde,bkd->bke", p.evecs, z[:, None, :] - a * p.means)


def _log_gaussian(y: Tensor, var: Tensor) -> Tensor:
    """``log N(y; 0, diag(var))`` summed over the last axis: ``(B, K, D) -> (B, K)``."""
    d = y.shape[-1]
    return -0.5 * ((y * y / var).sum(-1) + var.log().sum(-1) + d * math.log(2.0 * math.pi))


def _log_joint(z: Tensor, p: _Params, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``log w_k + log N(z; a mu_k, C_k)`` ``(B, K)``, with ``y`` and ``C_k``'s eigenvalues."""
    y = _whiten(z, p, a)
    var = a * a * p.evals + b * b
    return p.log_weights + _log_gaussian(y, var), y, var


def _shared_variance_velocity(z: Tensor, t: Tensor, p: _Params, var: float) -> Tensor:
    """The velocity when every ``S_k = var I``: with ``c = a^2 var + b^2`` and ``g = (b - a
    var) / c`` shared by the components, ``v = g z - (1 + a g) sum_k gamma_k mu_k`` (the
    general form with one eigenvalue; ``(B, D)`` in ``z``'s dtype)."""
    a, b = 1.0 - t, t
    c = a * a * var + b * b
    diff = z[:, None, :] - a[:, None, None] * p.means
    gamma = torch.softmax(p.log_weights - 0.5 * diff.square().sum(-1) / c[:, None], dim=-1)
    g = (b - a * var) / c
    return g[:, None] * z - (1.0 + a * g)[:, None] * (gamma @ p.means)


def _unequal_weights(k: int) -> Tensor:
    """Weights rising linearly from 1 to ``_UNEQUAL_RATIO`` over the components, normalised."""
    w = torch.linspace(1.0, _UNEQUAL_RATIO, k, dtype=torch.float64)
    return w / w.sum()


def _preset_weights(k: int, weights: object, unequal: bool) -> object:
    if weights is not None and unequal:
        raise ValueError("give either weights or unequal=True, not both")
    return _unequal_weights(k) if unequal else weights


def _check_std(std: object) -> float:
    if isinstance(std, bool) or not isinstance(std, int | float) or not math.isfinite(std):
        raise TypeError(f"std must be a finite real number, got {std!r}")
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    return float(std)


def _unit_variance_scale(std: float, spread: float, name: str) -> float:
    """Scale ``s`` with ``s^2 * spread + std^2 = 1``: the per-coordinate variance is one."""
    if std >= 1.0:
        raise ValueError(f"{name} has no unit-variance default when std >= 1; pass {name}")
    return math.sqrt((1.0 - std * std) / spread)


class GaussianMixture:
    """A Gaussian mixture in ``D`` dimensions with its exact flow-matching velocity.

    Data ``x ~ sum_k w_k N(mu_k, S_k)``; the path is ``z_t = (1 - t) x + t eps``,
    ``eps ~ N(0, I)``, with t = 0 data and t = 1 noise (arXiv 2209.03003, 2210.02747).
    :meth:`velocity` is a :class:`mfcore.fields.VelocityField` (and so is the object
    itself), the exact teacher every toy test compares against.

    Args:
        means: component means ``(K, D)``.
        covs: component covariances (variances, never standard deviations), as one of
            ``(K, D, D)`` full symmetric positive-definite matrices, ``(K, D)`` diagonal
            variances, or ``(K,)`` isotropic variances ``S_k = covs[k] I``. The form is read
            from the shape, so when ``K == D`` a 2-D ``covs`` is the diagonal form; pass a
            full covariance as ``(K, D, D)``. See :meth:`isotropic` to give standard
            deviations.
        weights: mixing weights ``(K,)``, strictly positive, summing to 1 (to 1e-6; they are
            renormalised exactly). ``None`` means equal weights.

    Raises:
        TypeError: a parameter is not real-valued.
        ValueError: a shape does not match ``(K, D)``, a covariance is not symmetric positive
            definite, a weight is not positive, or the weights do not sum to 1.
    """

    def __init__(self, means: object, covs: object, weights: object = None) -> None:
        self._means = _check_means(means)
        k, d = self._means.shape
        self._covs = _full_covariances(covs, k, d)
        self._evals, self._evecs = _eigen(self._covs)
        self._weights = _check_weights(weights, k)
        self._cache: dict[tuple[torch.device, torch.dtype], _Params] = {}
        shared = self._covs[0, 0, 0] * torch.eye(d, dtype=torch.float64)
        # every S_k = s^2 I with one s (the presets): the velocity has a cheaper closed form
        self._shared_var = float(shared[0, 0]) if bool((self._covs == shared).all()) else None

    # ----------------------------------------------------------------------- constructors
    @classmethod
    def isotropic(cls, means: object, std: object, weights: object = None) -> GaussianMixture:
        """A mixture with ``S_k = std_k^2 I``.

        Args:
            means: component means ``(K, D)``.
            std: standard deviation, a positive float shared by all components or ``(K,)``.
            weights: mixing weights ``(K,)`` or ``None`` for equal weights.
        """
        m = _check_means(means)
        s = _as_float64("std", std)
        k = m.shape[0]
        if s.ndim == 0:
            s = s.expand(k)
        if s.shape != (k,):
            raise ValueError(
                f"std must be a float or have shape (K,) = {(k,)}, got {tuple(s.shape)}"
            )
        _check_finite_param("std", s)
        if bool((s <= 0).any()):
            raise ValueError("std must be > 0")
        return cls(m, s * s, weights)

    @classmethod
    def ring(
        cls,
        n: int = 8,
        radius: float | None = None,
        std: float = _DEFAULT_STD,
        weights: object = None,
        *,
        unequal: bool = False,
    ) -> GaussianMixture:
        """``n`` isotropic 2-D Gaussians evenly spaced on a circle (the "8 Gaussians" toy).

        Means ``radius * (cos(2 pi k / n), sin(2 pi k / n))``, covariance ``std^2 I``. The
        default radius ``sqrt(2 (1 - std^2))`` (1.407 for ``std = 0.1``) makes the
        equal-weight mixture have mean 0 and unit variance per coordinate (for ``n >= 3``),
        like normalised image latents; neighbouring modes of ``ring8`` are then 10.8 stds
        apart.

        Args:
            n: number of components.
            radius: circle radius; ``None`` for the unit-variance default.
            std: per-coordinate standard deviation of every component.
            weights: explicit mixing weights ``(n,)``, or ``None``.
            unequal: weights rising linearly from 1 to 4 around the circle (normalised);
                exclusive with ``weights``.
        """
        check_positive_int("n", n)
        std = _check_std(std)
        if radius is None:
            radius = _unit_variance_scale(std, 0.5, "radius")
        angles = 2.0 * math.pi * torch.arange(n, dtype=torch.float64) / n
        means = float(radius) * torch.stack([angles.cos(), angles.sin()], dim=-1)
        return cls.isotropic(means, std, _preset_weights(n, weights, unequal))

    @classmethod
    def grid(
        cls,
        n: int = 5,
        spacing: float | None = None,
        std: float = _DEFAULT_STD,
        weights: object = None,
        *,
        unequal: bool = False,
    ) -> GaussianMixture:
        """``n x n`` isotropic 2-D Gaussians on a square grid centred at the origin.

        Means ``spacing * (i - (n - 1) / 2, j - (n - 1) / 2)`` for ``i, j < n``, row-major.
        The default spacing ``sqrt(12 (1 - std^2) / (n^2 - 1))`` (0.704 for ``n = 5``,
        ``std = 0.1``) gives the equal-weight mixture unit variance per coordinate;
        neighbouring modes of ``grid25`` are then 7 stds apart.

        Args:
            n: components per side (``n^2`` in all).
            spacing: distance between neighbouring means; ``None`` for the unit-variance
                default.
            std: per-coordinate standard deviation of every component.
            weights: explicit mixing weights ``(n^2,)``, or ``None``.
            unequal: weights rising linearly from 1 to 4 in row-major order (normalised);
                exclusive with ``weights``.
        """
        check_positive_int("n", n)
        std = _check_std(std)
        if spacing is None:
            spacing = 0.0 if n == 1 else _unit_variance_scale(std, (n * n - 1) / 12.0, "spacing")
        axis = float(spacing) * (torch.arange(n, dtype=torch.float64) - (n - 1) / 2.0)
        means = torch.cartesian_prod(axis, axis)
        return cls.isotropic(means, std, _preset_weights(n * n, weights, unequal))

    @classmethod
    def anisotropic3d(cls) -> GaussianMixture:
        """A held-out 3-D mixture the toys were never tuned on: six anisotropic components.

        Means on the axes of a rotated octahedron at distance 1.3, each covariance
        ``R_k diag(0.04^2, 0.08^2, 0.2^2) R_k^T`` with its own rotation ``R_k``, weights
        rising from 1 to 3 (normalised). Everything is drawn from a fixed seed, so it is
        the same mixture on every machine.
        """
        gen = torch.Generator().manual_seed(20261202)
        axes = torch.cat([torch.eye(3), -torch.eye(3)]).to(torch.float64)
        q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
        means = 1.3 * axes @ q.T
        scales = torch.tensor([0.04, 0.08, 0.2], dtype=torch.float64) ** 2
        covs = []
        for _ in range(6):
            r, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
            covs.append(r @ torch.diag(scales) @ r.T)
        cov = torch.stack(covs)
        cov = 0.5 * (cov + cov.transpose(1, 2))
        weights = torch.linspace(1.0, 3.0, 6, dtype=torch.float64)
        return cls(means, cov, weights / weights.sum())

    # ------------------------------------------------------------------------- properties
    @property
    def means(self) -> Tensor:
        """Component means ``(K, D)``, float64 (a copy)."""
        return self._means.clone()

    @property
    def covs(self) -> Tensor:
        """Component covariances ``(K, D, D)``, float64 (a copy)."""
        return self._covs.clone()

    @property
    def weights(self) -> Tensor:
        """Mixing weights ``(K,)``, float64, summing to 1 (a copy)."""
        return self._weights.clone()

    @property
    def num_components(self) -> int:
        """Number of components ``K``."""
        return self._means.shape[0]

    @property
    def dim(self) -> int:
        """Dimension ``D`` of the data."""
        return self._means.shape[1]

    def __repr__(self) -> str:
        return f"GaussianMixture(num_components={self.num_components}, dim={self.dim})"

    def moments(self) -> tuple[Tensor, Tensor]:
        """Mean ``(D,)`` and covariance ``(D, D)`` of the data distribution, float64.

        ``m = sum_k w_k mu_k`` and ``Cov = sum_k w_k (S_k + mu_k mu_k^T) - m m^T``.
        """
        w = self._weights
        mean = w @ self._means
        second = torch.einsum("k,kde->de", w, self._covs)
        second = second + torch.einsum("k,kd,ke->de", w, self._means, self._means)
        return mean, second - torch.outer(mean, mean)

    # ---------------------------------------------------------------------- exact fields
    def _params(self, device: torch.device, dtype: torch.dtype) -> _Params:
        """The parameters in ``compute_dtype(dtype)`` on ``device`` (cached)."""
        key = (torch.device(device), compute_dtype(dtype))
        if key not in self._cache:
            device, dtype = key
            w = self._weights
            parts = (self._means, self._evecs, self._evals, w.log(), w)
            self._cache[key] = _Params(*(x.to(device=device, dtype=dtype) for x in parts))
        return self._cache[key]

    def _marginal_parts(
        self, z: Tensor, t: Tensor
    ) -> tuple[_Params, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Validate ``(z, t)``; return ``(params, a, b, log_joint, y, var)`` in compute dtype."""
        _check_points("z", z, self.dim)
        check_time("t", t, z)
        p = self._params(z.device, z.dtype)
        a, b = _path_coefficients(t.to(p.means.dtype))
        log_joint, y, var = _log_joint(z.to(p.means.dtype), p, a, b)
        return p, a, b, log_joint, y, var

    def velocity(self, z: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """Exact marginal velocity ``v(z, t) = E[eps - x | z_t = z]``.

        ``v = sum_k gamma_k(z, t) (-mu_k + U_k diag((b - a l_k) / (a^2 l_k + b^2)) U_k^T
        (z - a mu_k))`` with ``a = 1 - t``, ``b = t`` and posteriors ``gamma_k`` from a
        log-sum-exp (Gaussian conditioning on the path of arXiv 2209.03003 / 2210.02747).
        Finite on the closed interval: ``v(z, 0) = -z`` and ``v(z, 1) = z - sum_k w_k mu_k``.
        When every component has the same isotropic covariance (the presets) the gain is
        one scalar per sample and ``v = g z - (1 + a g) sum_k gamma_k mu_k``.

        Args:
            z: states ``(B, D)`` at time ``t``.
            t: times ``(B,)`` in ``[0, 1]``.
            **cond: must be empty (the mixture is unconditional).

        Returns:
            velocity ``(B, D)`` in ``z``'s dtype.

        Raises:
            TypeError: conditioning was passed, or ``z``/``t`` are not floating tensors.
            ValueError: bad shapes, a non-finite ``z``, or ``t`` outside ``[0, 1]``.
        """
        if cond:
            raise TypeError(f"GaussianMixture is unconditional; got conditioning {sorted(cond)}")
        if self._shared_var is not None:
            _check_points("z", z, self.dim)
            check_time("t", t, z)
            p = self._params(z.device, z.dtype)
            v = _shared_variance_velocity(
                z.to(p.means.dtype), t.to(p.means.dtype), p, self._shared_var
            )
            return v.to(z.dtype)
        p, a, b, log_joint, y, var = self._marginal_parts(z, t)
        gamma = torch.softmax(log_joint, dim=-1)
        gain = (b - a * p.evals) / var
        per_component = torch.einsum("kde,bke->bkd", p.evecs, gain * y) - p.means
        return torch.einsum("bk,bkd->bd", gamma, per_component).to(z.dtype)

    def __call__(self, z: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """Same as :meth:`velocity`, so the mixture is itself a ``VelocityField``."""
        return self.velocity(z, t, **cond)

    def responsibilities(self, z: Tensor, t: Tensor) -> Tensor:
        """Component posteriors ``gamma_k(z, t) = P(k | z_t = z)``.

        ``gamma_k ∝ w_k N(z; (1 - t) mu_k, (1 - t)^2 S_k + t^2 I)``, normalised by log-sum-exp.

        Args:
            z: states ``(B, D)``.
            t: times ``(B,)`` in ``[0, 1]``.

        Returns:
            ``(B, K)`` rows summing to 1, in ``z``'s dtype.
        """
        log_joint = self._marginal_parts(z, t)[3]
        return torch.softmax(log_joint, dim=-1).to(z.dtype)

    def marginal_log_prob(self, z: Tensor, t: Tensor) -> Tensor:
        """Log density of ``z_t``: ``log sum_k w_k N(z; (1 - t) mu_k, (1 - t)^2 S_k + t^2 I)``.

        Args:
            z: states ``(B, D)``.
            t: times ``(B,)`` in ``[0, 1]``; ``t = 0`` is :meth:`log_prob`, ``t = 1`` is
                ``log N(z; 0, I)``.

        Returns:
            ``(B,)`` log densities in ``z``'s dtype.
        """
        log_joint = self._marginal_parts(z, t)[3]
        return torch.logsumexp(log_joint, dim=-1).to(z.dtype)

    def log_prob(self, x: Tensor) -> Tensor:
        """Log density of the data: ``log sum_k w_k N(x; mu_k, S_k)``.

        Args:
            x: points ``(B, D)``.

        Returns:
            ``(B,)`` log densities in ``x``'s dtype.
        """
        _check_points("x", x, self.dim)
        return self.marginal_log_prob(x, x.new_zeros(x.shape[0]))

    def mahalanobis(self, x: Tensor) -> Tensor:
        """Mahalanobis distance of each point to each component: ``|S_k^{-1/2} (x - mu_k)|``.

        Args:
            x: points ``(B, D)``.

        Returns:
            ``(B, K)`` distances in ``x``'s dtype.
        """
        _check_points("x", x, self.dim)
        p = self._params(x.device, x.dtype)
        one = torch.ones((), dtype=p.means.dtype, device=x.device)
        y = _whiten(x.to(p.means.dtype), p, one)
        return (y * y / p.evals).sum(-1).sqrt().to(x.dtype)

    def nearest_component(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The component nearest to each point in Mahalanobis distance.

        Args:
            x: points ``(B, D)``.

        Returns:
            ``(index, distance)``: component indices ``(B,)`` (int64) and their Mahalanobis
            distances ``(B,)`` in ``x``'s dtype.
        """
        distance, index = self.mahalanobis(x).min(dim=-1)
        return index, distance

    # --------------------------------------------------------------------------- sampling
    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        return_labels: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Draw ``n`` data points ``x = mu_k + U_k diag(sqrt(l_k)) e``, ``k ~ w``, ``e ~ N(0, I)``.

        Draws happen in float64 on ``device`` (so a seed gives the same points in every
        dtype) and are cast to ``dtype``.

        Args:
            n: number of points.
            generator: random generator; it must live on ``device``.
            device: where to draw; defaults to the generator's device, else CPU.
            dtype: floating dtype of the result.
            return_labels: also return the component of each point.

        Returns:
            points ``(n, D)``, and with ``return_labels`` their components ``(n,)`` (int64).
        """
        check_positive_int("n", n)
        _check_float_dtype(dtype)
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        p = self._params(device, torch.float64)
        labels = torch.multinomial(p.weights, n, replacement=True, generator=generator)
        e = torch.randn(n, self.dim, generator=generator, device=device, dtype=torch.float64)
        scaled = e * p.evals[labels].sqrt()
        x = p.means[labels] + torch.einsum("nde,ne->nd", p.evecs[labels], scaled)
        x = x.to(dtype)
        return (x, labels) if return_labels else x

    def sample_marginal(self, t: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``z_t = (1 - t) x + t eps`` with ``x`` from the mixture and ``eps ~ N(0, I)``.

        Args:
            t: times ``(B,)`` in ``[0, 1]``; sets the batch size, dtype and device.
            generator: random generator on ``t``'s device.

        Returns:
            states ``(B, D)`` in ``t``'s dtype.
        """
        check_time("t", t)
        x = self.sample(t.shape[0], generator=generator, device=t.device, dtype=torch.float64)
        eps = torch.randn(x.shape, generator=generator, device=t.device, dtype=torch.float64)
        tt = t.to(torch.float64)[:, None]
        return ((1.0 - tt) * x + tt * eps).to(t.dtype)


def _check_float_dtype(dtype: object) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")


presets: Mapping[str, Callable[[], GaussianMixture]] = MappingProxyType(
    {
        "ring8": lambda: GaussianMixture.ring(8),
        "ring8_unequal": lambda: GaussianMixture.ring(8, unequal=True),
        "grid25": lambda: GaussianMixture.grid(5),
        "grid25_unequal": lambda: GaussianMixture.grid(5, unequal=True),
        "aniso3d": GaussianMixture.anisotropic3d,
    }
)
"""Named mixtures: the 2-D rings and grids (component std 0.1, unit variance per coordinate
for equal weights) and the held-out 3-D ``aniso3d`` (:meth:`GaussianMixture.anisotropic3d`)."""


def preset(name: str) -> GaussianMixture:
    """Build a named mixture from :data:`presets`.

    Args:
        name: one of ``"ring8"``, ``"ring8_unequal"``, ``"grid25"``, ``"grid25_unequal"``,
            ``"aniso3d"``.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    check_choice("name", name, tuple(presets))
    return presets[name]()
