"""The kernel critic of trajectory distribution alignment (:mod:`mfcore.critics`): no network.

The squared MMD (a mixture of RBF bandwidths, Gretton et al., arXiv 0805.2368) or the energy
distance (Szekely & Rizzo 2013) between the student's segment-end states and teacher
samples noised to the same time (:func:`kernel_discrepancy`, :class:`KernelCritic`). Useful in
low dimensions and as a cross-check of the network critics.

**Data parallelism.** The discrepancy compares the student's *set* of states with the
teacher's, so per process it compares the local sets, and the average of local
discrepancies is not the discrepancy of the global sets (its within-set terms lose the
cross-process pairs). To get the global one, all-gather ``z_r`` and ``reference`` with the
autograd-aware ``torch.distributed.nn.functional.all_gather`` before
:func:`kernel_discrepancy`; ``mfcore-distill`` offers only the velocity critics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from mfcore._checks import check_bandwidths, check_same_device, check_tensor, check_weights, lookup
from mfcore.draws import Draws, draw_normal
from mfcore.fields import Weighting
from mfcore.path import compute_dtype, expand_time
from mfcore.solvers import sample_teacher

__all__ = ["KERNELS", "kernel_discrepancy", "KernelCritic"]


def _rbf_mixture(d_sq: Tensor, bandwidths: tuple[float, ...]) -> Tensor:
    """``mean_h exp(-d^2 / (2 h^2))``: a mixture of RBF kernels."""
    return sum(torch.exp(-d_sq / (2.0 * h * h)) for h in bandwidths) / len(bandwidths)


def _negative_distance(d_sq: Tensor, bandwidths: tuple[float, ...]) -> Tensor:
    """``-sqrt(d^2 + 1e-12)``: the energy distance's kernel (smoothed at 0)."""
    del bandwidths
    return -(d_sq + 1e-12).sqrt()


#: The kernels of :func:`kernel_discrepancy` by name: ``kernel(d_sq, bandwidths)`` of the
#: squared distances.
KERNELS: Mapping[str, Callable[[Tensor, tuple[float, ...]], Tensor]] = MappingProxyType(
    {"mmd": _rbf_mixture, "energy": _negative_distance}
)


def _pairwise_sq(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances ``(N, M)`` between flattened rows (exact, no matmul trick)."""
    return (a[:, None, :] - b[None, :, :]).square().sum(-1)


def kernel_discrepancy(
    a: Tensor,
    b: Tensor,
    *,
    kind: str = "mmd",
    bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0),
) -> Tensor:
    """A differentiable discrepancy between two clouds: squared MMD or energy distance.

    - ``"mmd"``: the unbiased squared MMD (Gretton et al., arXiv 0805.2368, eq. 3) with
      ``k(x, y) = mean_h exp(-||x - y||^2 / (2 h^2))`` over the ``bandwidths``;
    - ``"energy"``: ``2 E||a - b|| - E||a - a'|| - E||b - b'||`` (Szekely & Rizzo 2013),
      within-cloud means over distinct pairs, with ``||.||`` smoothed as
      ``sqrt(d^2 + 1e-12)`` so its gradient exists at 0.

    Both vanish in expectation iff the distributions agree (characteristic kernels).

    Args:
        a: points ``(N, ...)`` (flattened per sample), ``N >= 2``; gradients flow into it.
        b: points ``(M, ...)`` with the same per-sample shape, ``M >= 2``.
        kind: ``"mmd"`` or ``"energy"``.
        bandwidths: positive RBF bandwidths for ``"mmd"``.

    Returns:
        a 0-dim tensor (fp32 at least).

    Example:
        >>> import torch
        >>> from mfcore.critics import kernel_discrepancy
        >>> g = torch.Generator().manual_seed(0)
        >>> a, b = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
        >>> same, shifted = kernel_discrepancy(a, b), kernel_discrepancy(a, b + 3.0)
        >>> bool(shifted > 10 * same.abs())  # a shift of 3 standard deviations shows
        True
    """
    check_tensor("a", a, ndim_min=1)
    check_tensor("b", b, ndim_min=1)
    kernel = lookup("kind", kind, KERNELS)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"a and b must share the per-sample shape, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"a and b need at least 2 points each, got {a.shape[0]}, {b.shape[0]}")
    check_same_device("a", a, b, "b")
    return _discrepancy(a, b, kernel, check_bandwidths(bandwidths))


def _discrepancy(a: Tensor, b: Tensor, kernel, bandwidths: tuple[float, ...]) -> Tensor:
    """:func:`kernel_discrepancy` on trusted arguments (``kernel`` of :data:`KERNELS`)."""
    work = compute_dtype(a.dtype)
    x, y = a.flatten(1).to(work), b.flatten(1).to(work)
    within_x, within_y = _within(x, kernel, bandwidths), _within(y, kernel, bandwidths)
    return within_x + within_y - 2.0 * kernel(_pairwise_sq(x, y), bandwidths).mean()


def _within(x: Tensor, kernel, bandwidths: tuple[float, ...]) -> Tensor:
    """The kernel's mean over the distinct pairs of ``x`` (masked, not indexed: no sync)."""
    n = x.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    return torch.where(off, kernel(_pairwise_sq(x, x), bandwidths), 0.0).sum() / (n * (n - 1))


class KernelCritic:
    """Kernel critic: :func:`kernel_discrepancy` between student and teacher states.

    At a segment end ``r`` it compares the student's states ``z_r`` with teacher samples
    ``x`` noised to the same time, ``(1 - r) x + r eps`` (exact samples of the teacher's
    marginal at ``r`` when ``x`` are the teacher's samples). No network, no critic step.

    Args:
        kind: ``"mmd"`` (mixture of RBF kernels) or ``"energy"``.
        bandwidths: RBF bandwidths for ``"mmd"`` (suited to unit-variance data by default).

    A :class:`~mfcore.fields.SampleCritic`: :class:`~mfcore.critics.AlignmentLoss` calls it
    with checked segments and reference samples, which it does not check again.
    """

    def __init__(
        self, kind: str = "mmd", bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0)
    ) -> None:
        self._kernel = lookup("kind", kind, KERNELS)
        self.kind = kind
        self.bandwidths = check_bandwidths(bandwidths)

    def reference_samples(
        self,
        teacher: Callable[..., Tensor],
        like: Tensor,
        *,
        steps: int,
        cond: dict[str, Any],
        generator: Draws,
    ) -> Tensor:
        """Teacher samples at ``t = 0`` shaped like ``like``: a ``steps``-step Heun solve from
        fresh noise drawn from ``generator``."""
        fresh = draw_normal(like.shape, generator, device=like.device, dtype=like.dtype)
        return sample_teacher(teacher, fresh, steps, method="heun", cond=cond)

    def alignment_loss(
        self,
        z_r: Tensor,
        r: Tensor,
        t: Tensor,
        *,
        teacher: Callable[..., Tensor] | None = None,
        weighting: Weighting | None = None,
        reference: Tensor | None = None,
        cond: Mapping[str, Any] | None = None,
        generator: Draws = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Discrepancy between ``z_r`` and ``reference`` noised to ``r``.

        Args:
            z_r: student states ``(B, ...)`` at ``r`` (attached).
            r: segment ends ``(B,)``; ``t``: segment starts ``(B,)``, ``r < t``.
            teacher, cond: unused (the reference stands for the teacher).
            weighting: optional :class:`~mfcore.fields.Weighting`, called ``w(d^2, r, r)``
                with each state's squared distance ``d^2`` to its nearest noised reference
                sample; the weights' batch mean multiplies the discrepancy.
            reference: teacher samples at ``t = 0``, ``(B, ...)`` like ``z_r``.
            generator: random generator (or :class:`~mfcore.draws.BatchRows`) for the noise.

        Returns:
            ``(loss, {"align_kernel": loss})``.
        """
        del teacher, cond
        if reference is None:
            raise ValueError("KernelCritic needs reference (teacher samples at t = 0)")
        noise = draw_normal(z_r.shape, generator, device=z_r.device, dtype=z_r.dtype)
        work = compute_dtype(z_r.dtype)
        rr = expand_time(r.to(work), z_r)
        ref_r = (1.0 - rr) * reference.detach().to(work) + rr * noise.to(work)
        loss = _discrepancy(z_r, ref_r, self._kernel, self.bandwidths)
        if weighting is not None:
            with torch.no_grad():
                work_z = z_r.detach().flatten(1).to(work)
                nearest = _pairwise_sq(work_z, ref_r.flatten(1)).min(1).values
            loss = loss * check_weights(weighting(nearest, r, r), nearest).mean()
        return loss, {"align_kernel": loss.detach()}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state
