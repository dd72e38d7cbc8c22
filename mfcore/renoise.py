"""Re-noising within a segment: the Gaussian transition the velocity critics train on.

A state ``z_r`` of the path ``z_r = (1 - r) x + r e`` moves to ``s >= r`` along the same path
by the Gaussian transition

    z_s = a z_r + sigma eps,   a = (1 - s) / (1 - r),   sigma^2 = s^2 - a^2 r^2,

(:func:`renoise`), so ``z_s = (1 - s) x + s e'`` with ``e' ~ N(0, I)`` (TDM's in-segment
re-noising, arXiv 2503.06674). Its velocity ``dz_s/ds = a' z_r + sigma' eps``
(:func:`renoise_velocity`) has, conditionally on ``z_s``, the mean of the path's velocity
``E[e' - x | z_s]``: regressing a network onto it is flow matching of the re-noised
distribution (for ``r = 0`` it is the usual ``eps - x``), with weight :func:`renoise_weight`.
:func:`surrogate_loss` injects a given gradient into a graph (DMD, arXiv 2311.18828).

Each function checks its arguments unless ``validate=False`` (as ``torch.distributions``'
``validate_args``): the critics call them with segments :class:`~mfcore.critics.AlignmentLoss`
checked once, so a training step checks nothing twice and adds no host sync.

Shapes: states ``(B, ...)``, times ``(B,)``.
"""

from __future__ import annotations

from torch import Tensor

from mfcore._checks import check_interval, check_like, check_tensor, check_time
from mfcore.draws import Draws, draw_uniform
from mfcore.path import compute_dtype, expand_time

__all__ = [
    "MIN_FRACTION",
    "renoise",
    "renoise_velocity",
    "renoise_weight",
    "draw_renoise_time",
    "surrogate_loss",
]

#: The smallest ``(s - r) / (t - r)`` :func:`draw_renoise_time` draws, keeping ``sigma > 0``.
MIN_FRACTION = 1e-3


def _transition(r: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(a, sigma, da/ds, dsigma/ds)`` of the path's transition from ``r`` to ``s``."""
    one_minus_r = 1.0 - r
    a = (1.0 - s) / one_minus_r
    var = (s * s - (a * r) ** 2).clamp_min(0.0)
    sigma = var.sqrt()
    da = -1.0 / one_minus_r
    dvar_half = s - a * da * r * r  # (1/2) d(sigma^2)/ds
    dsigma = dvar_half / sigma
    return a, sigma, da.expand_as(a), dsigma


def _check_renoise(z_r: Tensor, r: Tensor, s: Tensor, noise: Tensor, strict: bool) -> None:
    """``r <= s`` (``r < s`` for the velocity, singular at ``s = r``) and ``r < 1``."""
    check_tensor("z_r", z_r, ndim_min=1)
    check_interval(r, s, z_r, names=("r", "s"), strict=strict)
    check_like("noise", noise, z_r, "z_r")
    if not strict and bool((r >= 1).any()):  # strict: r < s <= 1 already
        raise ValueError("r must be < 1 (the transition from pure noise is undefined)")


def renoise(z_r: Tensor, r: Tensor, s: Tensor, noise: Tensor, *, validate: bool = True) -> Tensor:
    """Move ``z_r`` from time ``r`` to ``s >= r`` along the path ``z = (1 - t) x + t e``.

    ``z_s = a z_r + sigma eps`` with ``a = (1 - s) / (1 - r)`` and
    ``sigma^2 = s^2 - a^2 r^2``: if ``z_r = (1 - r) x + r e`` then
    ``z_s = (1 - s) x + s e'`` with ``e' ~ N(0, I)`` (TDM's in-segment re-noising,
    arXiv 2503.06674). ``s = r`` returns ``z_r``; ``r = 0`` gives ``(1 - s) z_0 + s eps``.

    Args:
        z_r: states ``(B, ...)`` at time ``r``.
        r: times ``(B,)`` in ``[0, 1)``.
        s: times ``(B,)`` with ``r <= s <= 1``.
        noise: ``eps`` ``(B, ...)``, standard normal.
        validate: check the arguments (off for arguments checked already).

    Returns:
        ``z_s`` ``(B, ...)`` in ``z_r``'s dtype (coefficients in fp32 at least); differentiable
        with respect to ``z_r``.
    """
    if validate:
        _check_renoise(z_r, r, s, noise, strict=False)
    work = compute_dtype(z_r.dtype)
    a, sigma, _, _ = _transition(r.to(work), s.to(work))
    z_s = expand_time(a, z_r) * z_r.to(work) + expand_time(sigma, z_r) * noise.to(work)
    return z_s.to(z_r.dtype)


def renoise_velocity(
    z_r: Tensor, r: Tensor, s: Tensor, noise: Tensor, *, validate: bool = True
) -> Tensor:
    """Velocity ``dz_s/ds = a' z_r + sigma' eps`` of :func:`renoise` (the critic's target).

    With ``a' = -1 / (1 - r)`` and ``sigma' = (s + (1 - s) r^2 / (1 - r)^2) / sigma``. Given
    ``z_s`` its mean is the path's velocity ``E[e' - x | z_s]`` (because
    ``a a' r^2 + sigma sigma' = s``), so it is an unbiased flow-matching target for the
    re-noised distribution; for ``r = 0`` it is ``eps - z_0``.

    Args:
        z_r: states ``(B, ...)`` at time ``r``.
        r: times ``(B,)`` in ``[0, 1)``.
        s: times ``(B,)`` with ``r < s <= 1`` (``sigma' = inf`` at ``s = r``).
        noise: ``eps`` ``(B, ...)``, the same as given to :func:`renoise`.
        validate: check the arguments (off for arguments checked already).

    Returns:
        the velocity ``(B, ...)`` in ``z_r``'s dtype.
    """
    if validate:
        _check_renoise(z_r, r, s, noise, strict=True)
    work = compute_dtype(z_r.dtype)
    _, _, da, dsigma = _transition(r.to(work), s.to(work))
    vel = expand_time(da, z_r) * z_r.to(work) + expand_time(dsigma, z_r) * noise.to(work)
    return vel.to(z_r.dtype)


def renoise_weight(r: Tensor, s: Tensor, *, validate: bool = True) -> Tensor:
    """Flow-matching weight ``sigma^2 / s^2`` of the re-noised target, ``(B,)`` in ``(0, 1]``.

    The share of ``s^2`` contributed by fresh noise: 1 for ``r = 0`` (plain flow matching),
    and it cancels the ``1 / sigma^2`` growth of the target's variance as ``s -> r``.
    """
    if validate:
        check_time("r", r)
        check_time("s", s, batch=r.shape[0])
    work = compute_dtype(r.dtype)
    _, sigma, _, _ = _transition(r.to(work), s.to(work))
    return (sigma / s.to(work)).square().to(r.dtype)


def draw_renoise_time(r: Tensor, t: Tensor, generator: Draws) -> Tensor:
    """``s = r + (t - r) u`` with ``u ~ U[MIN_FRACTION, 1]``: a time inside each segment
    ``[r, t]`` ``(B,)``, above ``r``, in the compute dtype of ``r``."""
    u = draw_uniform(r.shape, generator, device=r.device, dtype=compute_dtype(r.dtype))
    u = MIN_FRACTION + (1.0 - MIN_FRACTION) * u
    # Kept in the compute dtype: cast back to bf16, s would round onto r for short segments.
    return (r.to(u.dtype) + (t - r).to(u.dtype) * u).clamp(max=1.0)


def surrogate_loss(x: Tensor, g: Tensor, *, validate: bool = True) -> Tensor:
    """Per-sample ``1/2 ||x - sg(x - g)||^2`` (summed over non-batch dims), ``(B,)``.

    Its value is ``||g||^2 / 2`` and its gradient with respect to ``x`` is ``g`` (DMD,
    arXiv 2311.18828): a way to inject a given gradient into any graph.

    Args:
        x: tensor ``(B, ...)`` attached to the graph.
        g: the gradient to inject, ``(B, ...)`` (detached here).
        validate: check the arguments (off for arguments checked already).
    """
    if validate:
        check_tensor("x", x, ndim_min=1)
        check_like("g", g, x, "x")
    work = compute_dtype(x.dtype)
    xw = x.to(work)
    return 0.5 * (xw - (xw - g.to(work)).detach()).square().flatten(1).sum(1)
