"""The target-agreement signals of the warm-up switch, and the gate and guard built on them.

Two signals compare the discrete and the differential targets on the same batch (the seed
paper's switch, arXiv 2605.17834, Sec. 3; :mod:`mfcore.warmup`), pooled over the pairs with
``r < t`` and per gap bin ``t - r``:

- ``delta = ||u_diff - u_disc|| / ||u_disc||``: how far apart the two targets are. For the
  exact average velocity ``u_diff = u`` and ``delta`` is the discrete target's own error;
- ``rho = ||u_diff - u_disc|| / ||u - u_disc||``: 1 for the exact field (``u_diff = u``);
  above 1 the differential target points further from the discrete one than the student's
  prediction does, so training on it would move the student away from what it fits.

Norms are pooled as sums of squares (``delta^2 = sum ||u_diff - u_disc||^2 /
sum ||u_disc||^2``), so the sums of several ranks or evaluations simply add
(:func:`agreement_sums`). :class:`SwitchGate` says when the signals allow the switch;
:class:`SwitchGuard` holds the settings of the watch after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mfcore._checks import check_interval, check_like, check_positive_int, check_real, check_tensor
from mfcore.path import compute_dtype

__all__ = [
    "DEFAULT_GAP_EDGES",
    "AGREEMENT_ROWS",
    "check_gap_edges",
    "gap_bin_names",
    "agreement_sums",
    "AgreementSignals",
    "target_agreement",
    "SwitchGate",
    "SwitchGuard",
]

DEFAULT_GAP_EDGES: tuple[float, ...] = (0.0, 0.05, 0.2, 0.5, 1.0)
"""Gap bins ``(e_i, e_{i+1}]`` of ``t - r`` for the signals and the toys' probe."""

#: Rows of :func:`agreement_sums`.
AGREEMENT_ROWS = 5


def check_gap_edges(edges: object) -> tuple[float, ...]:
    """``edges`` as floats ``0 = e_0 < ... < e_n = 1`` (``ValueError`` otherwise)."""
    if not isinstance(edges, tuple | list) or len(edges) < 2:
        raise ValueError(f"edges must be a sequence 0 = e_0 < ... < e_n = 1, got {edges!r}")
    values = tuple(check_real("edges", e, minimum=0.0) for e in edges)
    steps = zip(values[:-1], values[1:], strict=True)
    if values[0] != 0.0 or values[-1] != 1.0 or any(b <= a for a, b in steps):
        raise ValueError(f"edges must increase strictly from 0 to 1, got {edges!r}")
    return values


def gap_bin_names(edges: tuple[float, ...] = DEFAULT_GAP_EDGES) -> tuple[str, ...]:
    """Names of the gap bins ``(e_i, e_{i+1}]``, e.g. ``"gap<=0.05"``, ``"gap<=0.2"``."""
    return tuple(f"gap<={e:g}" for e in check_gap_edges(edges)[1:])


# --------------------------------------------------------------------------- signals


def agreement_sums(
    pred: Tensor, u_disc: Tensor, u_diff: Tensor, r: Tensor, t: Tensor, *, edges: Tensor
) -> Tensor:
    """Per-bin sums ``(5, n_bins)`` over the pairs with ``r < t``, no sync: the count,
    ``||u_diff - u_disc||^2``, ``||u_disc||^2``, ``||u - u_disc||^2`` and ``||u_diff - u||^2``
    (``pred`` is ``u``; ``edges`` the gap bins' edges as a tensor). They add over batches
    and ranks; :meth:`AgreementSignals.from_sums` turns them into the signals."""
    work = compute_dtype(pred.dtype)
    gap = t.to(work) - r.to(work)
    bins = (torch.bucketize(gap, edges.to(work), right=False) - 1).clamp(0, edges.numel() - 2)
    weight = (gap > 0).to(work)
    pred, u_disc, u_diff = pred.to(work), u_disc.to(work), u_diff.to(work)
    fit_sq = (pred - u_disc).flatten(1).pow(2).sum(1)
    gap_sq = (u_diff - u_disc).flatten(1).pow(2).sum(1)
    disc_sq = u_disc.flatten(1).pow(2).sum(1)
    step_sq = (u_diff - pred).flatten(1).pow(2).sum(1)
    rows = torch.stack([torch.ones_like(gap_sq), gap_sq, disc_sq, fit_sq, step_sq]) * weight
    out = torch.zeros(AGREEMENT_ROWS, edges.numel() - 1, dtype=work, device=pred.device)
    return out.index_add_(1, bins, rows)


def _ratio(num: float, den: float) -> float:
    return math.sqrt(num / den) if den > 0 else math.inf


@dataclass(frozen=True)
class AgreementSignals:
    """The target-agreement signals of one evaluation (host floats).

    Attributes:
        delta, rho: pooled over the pairs with ``r < t`` (``inf`` where a denominator is 0).
        drift: ``||u_diff - u|| / ||u - u_disc||``, how far the differential target would move
            the student relative to its fit error (0 for the exact field; 2 where ``u_diff``
            mirrors ``u`` around ``u_disc``, as for a teacher-initialised student, whose
            ``rho`` is then 1 too). With ``rho`` it fixes the angle between the two moves.
        fit: ``||u - u_disc|| / ||u_disc||`` (``= delta / rho``).
        delta_bins, rho_bins, drift_bins: per gap bin (bins with no pair are left out).
        counts: pairs per gap bin.
    """

    delta: float
    rho: float
    drift: float
    fit: float
    delta_bins: dict[str, float]
    rho_bins: dict[str, float]
    drift_bins: dict[str, float]
    counts: dict[str, int]

    @classmethod
    def from_sums(cls, sums: list[list[float]], names: tuple[str, ...]) -> AgreementSignals:
        """Build from per-bin sums ``(5, n_bins)`` as nested lists."""
        count, gap_sq, disc_sq, fit_sq, step_sq = sums
        present = [i for i, n in enumerate(count) if n > 0]
        return cls(
            delta=_ratio(sum(gap_sq), sum(disc_sq)),
            rho=_ratio(sum(gap_sq), sum(fit_sq)),
            drift=_ratio(sum(step_sq), sum(fit_sq)),
            fit=_ratio(sum(fit_sq), sum(disc_sq)),
            delta_bins={names[i]: _ratio(gap_sq[i], disc_sq[i]) for i in present},
            rho_bins={names[i]: _ratio(gap_sq[i], fit_sq[i]) for i in present},
            drift_bins={names[i]: _ratio(step_sq[i], fit_sq[i]) for i in present},
            counts={names[i]: int(round(count[i])) for i in present},
        )

    def metrics(self) -> dict[str, float]:
        """Flat ``{"agree_delta": ..., "agree_rho": ..., "agree_delta/gap<=0.05": ...}``."""
        out = {"agree_delta": self.delta, "agree_rho": self.rho, "agree_drift": self.drift}
        out |= {f"agree_delta/{k}": v for k, v in self.delta_bins.items()}
        out |= {f"agree_rho/{k}": v for k, v in self.rho_bins.items()}
        out |= {f"agree_drift/{k}": v for k, v in self.drift_bins.items()}
        return out


def target_agreement(
    pred: Tensor,
    u_disc: Tensor,
    u_diff: Tensor,
    r: Tensor,
    t: Tensor,
    *,
    edges: tuple[float, ...] = DEFAULT_GAP_EDGES,
) -> AgreementSignals:
    """The signals ``delta`` and ``rho`` of a batch (see the module docstring).

    Args:
        pred: the student's ``u(z_t, r, t)``, ``(B, ...)``.
        u_disc: the discrete target on the same batch, ``(B, ...)``.
        u_diff: the differential target ``v - (t - r) du/dt`` on the same batch, ``(B, ...)``.
        r, t: ``(B,)`` times with ``r <= t``; pairs with ``r = t`` are left out.
        edges: the gap bins' edges.

    Returns:
        :class:`AgreementSignals`.
    """
    check_tensor("pred", pred, ndim_min=1)
    check_like("u_disc", u_disc, pred, "pred")
    check_like("u_diff", u_diff, pred, "pred")
    r, t = check_interval(r, t, pred)
    names = gap_bin_names(edges)
    grid = torch.tensor(check_gap_edges(edges), dtype=torch.float64, device=pred.device)
    sums = agreement_sums(pred.detach(), u_disc, u_diff, r, t, edges=grid)
    return AgreementSignals.from_sums(sums.tolist(), names)


# --------------------------------------------------------------------------- gate and guard


@dataclass(frozen=True)
class SwitchGate:
    """Switch only when the targets agree: ``delta <= delta_max`` and ``rho <= rho_max``,
    pooled and in every gap bin with at least ``min_count`` pairs, at ``patience``
    evaluations in a row.

    Attributes:
        delta_max: largest ``delta`` (relative distance of the targets).
        rho_max: largest ``rho`` (1 for the exact field).
        patience: consecutive evaluations that must hold.
        min_count: pairs a gap bin needs to be judged (fewer: the bin is skipped).
    """

    delta_max: float = 0.1
    rho_max: float = 1.5
    patience: int = 3
    min_count: int = 4

    def __post_init__(self) -> None:
        check_real("delta_max", self.delta_max, minimum=0.0, strict=True)
        check_real("rho_max", self.rho_max, minimum=0.0, strict=True)
        check_positive_int("patience", self.patience)
        check_positive_int("min_count", self.min_count)

    def holds(self, signals: AgreementSignals) -> bool:
        """Whether one evaluation's signals pass (pooled and per judged bin)."""
        if not (signals.delta <= self.delta_max and signals.rho <= self.rho_max):
            return False
        for name, n in signals.counts.items():
            if n < self.min_count:
                continue
            if not (
                signals.delta_bins[name] <= self.delta_max
                and signals.rho_bins[name] <= self.rho_max
            ):
                return False
        return True


@dataclass(frozen=True)
class SwitchGuard:
    """Revert to the discrete target when the student drifts after the switch.

    At the switch the current batch becomes the held-out batch (its first ``batch``
    samples): its discrete targets are computed once, and the student's relative error on
    them, ``e = sum ||u - u_disc||^2 / sum ||u_disc||^2``, is the reference ``e_0``. Every
    ``every`` steps after the switch ``e`` is measured again with one forward; when
    ``e > (1 + margin) e_0`` at ``patience`` checks in a row the target reverts.

    Attributes:
        margin: allowed relative rise of the held-out error.
        patience: consecutive checks above the bar before a revert.
        batch: held-out samples kept (``None``: the whole batch at the switch).
        max_reverts: reverts allowed; after the last one the target stays discrete.
    """

    margin: float = 0.25
    patience: int = 2
    batch: int | None = None
    max_reverts: int = 1

    def __post_init__(self) -> None:
        check_real("margin", self.margin, minimum=0.0)
        check_positive_int("patience", self.patience)
        if self.batch is not None:
            check_positive_int("batch", self.batch)
        check_positive_int("max_reverts", self.max_reverts)
