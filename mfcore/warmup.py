"""The warm-up switch of the seed method, and the signals, gate and guard that make it safe.

The seed paper (arXiv 2605.17834, Sec. 3) trains a MeanFlow student on a *discrete* target
first (the teacher's ODE secant over ``[r, t]``) and then switches to the *differential*
target ``u_tgt = v - (t - r) sg(du/dt)`` (MeanFlow, arXiv 2505.13447, eq. 10). The
differential target is exact at its fixed point, but away from it the stop-gradient term
feeds the student's own derivative error back as a target: a student whose *values* fit
the discrete target can still have a ``du/dt`` that is far off (the discrete target
supervises values, never derivatives), and then the switch undoes the fit (docs/toys.md).

Two signals compare the targets on the same batch, at the cost of one extra JVP every
``every`` steps, pooled over the pairs with ``r < t`` and per gap bin ``t - r``:

- ``delta = ||u_diff - u_disc|| / ||u_disc||``: how far apart the two targets are. For the
  exact average velocity ``u_diff = u`` and ``delta`` is the discrete target's own error;
- ``rho = ||u_diff - u_disc|| / ||u - u_disc||``: 1 for the exact field (``u_diff = u``);
  above 1 the differential target points further from the discrete one than the student's
  prediction does, so training on it would move the student away from what it fits.

Norms are pooled as sums of squares (``delta^2 = sum ||u_diff - u_disc||^2 /
sum ||u_disc||^2``), so the sums of several ranks or evaluations simply add.

:class:`SwitchGate` switches only once both signals hold, pooled and in every gap bin, for
``patience`` evaluations in a row. :class:`SwitchGuard` watches the student after the
switch on a held-out batch whose discrete targets are computed once, at the switch: when
its error rises past its value at the switch by ``margin`` for ``patience`` checks, the
target reverts to the discrete one and the event is logged (``warmup_reverted``; a trainer
may also restore the weights it saved at ``warmup_switched``).

Every decision is taken on host values read once per ``every`` steps (one sync), after an
optional ``reduce`` (e.g. a ``torch.distributed`` all-reduce of the sums), so all ranks
decide alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mfcore._checks import (
    check_choice,
    check_fraction,
    check_interval,
    check_like,
    check_positive_int,
    check_real,
    check_tensor,
    compute_dtype,
    expand_time,
)
from mfcore.fields import DiscreteTarget, TargetOutput
from mfcore.targets import DifferentialTarget

__all__ = [
    "DEFAULT_GAP_EDGES",
    "HANDOVERS",
    "gap_bin_names",
    "AgreementSignals",
    "target_agreement",
    "SwitchGate",
    "SwitchGuard",
    "WarmupTarget",
    "SwitchRollback",
]

DEFAULT_GAP_EDGES: tuple[float, ...] = (0.0, 0.05, 0.2, 0.5, 1.0)
"""Gap bins ``(e_i, e_{i+1}]`` of ``t - r`` for the signals and the toys' probe."""

_PHASES = ("discrete", "blend", "differential")
#: How :class:`WarmupTarget` hands over from the discrete to the differential target.
HANDOVERS = ("blend", "gap")
_ROWS = 5  # per-bin sums: count, ||u_diff - u_disc||^2, ||u_disc||^2, ||u - u_disc||^2,
# ||u_diff - u||^2


def _check_edges(edges: object) -> tuple[float, ...]:
    if not isinstance(edges, tuple | list) or len(edges) < 2:
        raise ValueError(f"edges must be a sequence 0 = e_0 < ... < e_n = 1, got {edges!r}")
    values = tuple(check_real("edges", e, minimum=0.0) for e in edges)
    steps = zip(values[:-1], values[1:], strict=True)
    if values[0] != 0.0 or values[-1] != 1.0 or any(b <= a for a, b in steps):
        raise ValueError(f"edges must increase strictly from 0 to 1, got {edges!r}")
    return values


def gap_bin_names(edges: tuple[float, ...] = DEFAULT_GAP_EDGES) -> tuple[str, ...]:
    """Names of the gap bins ``(e_i, e_{i+1}]``, e.g. ``"gap<=0.05"``, ``"gap<=0.2"``."""
    return tuple(f"gap<={e:g}" for e in _check_edges(edges)[1:])


# --------------------------------------------------------------------------- signals


def _agreement_sums(
    pred: Tensor, u_disc: Tensor, u_diff: Tensor, r: Tensor, t: Tensor, edges: Tensor
) -> Tensor:
    """Per-bin sums ``(5, n_bins)`` (see ``_ROWS``) over the pairs with ``r < t``; no sync."""
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
    out = torch.zeros(_ROWS, edges.numel() - 1, dtype=work, device=pred.device)
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
    grid = torch.tensor(_check_edges(edges), dtype=torch.float64, device=pred.device)
    sums = _agreement_sums(pred.detach(), u_disc, u_diff, r, t, grid)
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


# --------------------------------------------------------------------------- the switch


def _detached(cond: Mapping[str, Any], keep: int | None) -> dict[str, Any]:
    """A copy of the conditioning with tensors detached (and cut to ``keep`` samples)."""
    out = {}
    for k, v in cond.items():
        if isinstance(v, Tensor):
            v = v.detach()
            if keep is not None and v.ndim > 0:
                v = v[:keep]
        out[k] = v
    return out


def _as_float(x: Any) -> float | None:
    return None if x is None else float(x)


class WarmupTarget:
    """Warm-up switch: a discrete target first, then the differential one.

    The switch fires when its conditions hold at a step:

    - ``switch_step`` (a fixed step, as the paper reproduces) or ``threshold`` (the moving
      average, decay ``ema``, of the relative fit error ``e = sum ||u - u_tgt||^2 /
      sum ||u_tgt||^2`` on the discrete target drops below it, after ``min_steps``): either
      one; with neither, the gate alone decides;
    - and, with a ``gate``, the target-agreement signals hold (:class:`SwitchGate`).

    The fit error watches the student's values only, which fit even when the switch fails;
    the gate watches the targets themselves. After the switch, ``blend_steps`` optionally
    ramps the target linearly from the discrete to the differential one, and a ``guard``
    (:class:`SwitchGuard`) reverts to the discrete target when the student drifts.

    Signals, gate, guard and threshold are evaluated every ``every`` steps (the signals
    during the discrete phase, at one extra JVP each; the guard after the switch, at one
    forward); ``every=None`` turns the signals off (then no gate). Each evaluation reads its
    statistics to the host once, after ``reduce`` (a sum over ranks, e.g.
    ``torch.distributed.all_reduce``; default none).

    Args:
        discrete: a :class:`~mfcore.fields.DiscreteTarget`
            (:class:`~mfcore.targets.TeacherODETarget`, :class:`~mfcore.targets.SplitTarget`).
        differential: a :class:`~mfcore.targets.DifferentialTarget` (default ``"func"``).
        switch_step: fixed switch step (with a gate: the earliest one).
        threshold: fit-error threshold of the automatic criterion (``None``: off).
        ema: decay of the fit error's moving average.
        min_steps: earliest step at which the threshold may fire.
        blend_steps: length of the hand-over after the switch (0: switch at once).
        handover: how the target moves to the differential one over ``blend_steps``, with a
            weight ``alpha`` ramping linearly from 0 to 1: ``"blend"``, the mix
            ``alpha u_diff + (1 - alpha) u_disc``; ``"gap"``, the differential target on
            the intervals with ``t - r <= alpha`` and the discrete one (integrated there
            only) on the longer ones, short intervals first as the gap curriculum of
            arXiv 2511.19065 orders them.
        gate: a :class:`SwitchGate` (``None``: switch without looking at the targets).
        guard: a :class:`SwitchGuard` (``None``: never revert).
        every: cadence of the signals, gate, guard and threshold checks.
        edges: gap-bin edges of the signals.
        reduce: ``reduce(tensor) -> tensor`` summing statistics over ranks, in place or not.

    The step is the ``step`` passed to ``__call__`` (the loss passes its own), or an
    internal counter of calls when none is given. ``state_dict()`` holds the phase, the
    fit error, the gate's streak and the guard's held-out batch and counters, so a resumed
    run continues exactly.

    Example:
        >>> import torch
        >>> from mfcore import MeanFlowLoss, TeacherODETarget, WarmupTarget
        >>> warm = WarmupTarget(TeacherODETarget(steps=4), switch_step=2)
        >>> loss_fn = MeanFlowLoss(target=warm)
        >>> teacher = lambda z, t: -z
        >>> student = lambda z, r, t: -z
        >>> for step in range(3):
        ...     loss, metrics = loss_fn(student, torch.randn(8, 2), teacher=teacher, step=step)
        ...     print(step, warm.phase)
        0 discrete
        1 discrete
        2 differential
    """

    def __init__(
        self,
        discrete,
        differential: DifferentialTarget | None = None,
        *,
        switch_step: int | None = None,
        threshold: float | None = None,
        ema: float = 0.9,
        min_steps: int = 0,
        blend_steps: int = 0,
        handover: str = "blend",
        gate: SwitchGate | None = None,
        guard: SwitchGuard | None = None,
        every: int | None = 10,
        edges: tuple[float, ...] = DEFAULT_GAP_EDGES,
        reduce: Callable[[Tensor], Tensor | None] | None = None,
    ) -> None:
        if not (isinstance(discrete, DiscreteTarget) and discrete.phase == "discrete"):
            raise TypeError(
                "discrete must be a DiscreteTarget whose phase is 'discrete' (TeacherODETarget, "
                f"SplitTarget), got {type(discrete).__name__}"
            )
        differential = differential if differential is not None else DifferentialTarget()
        if not isinstance(differential, DifferentialTarget):
            raise TypeError("differential must be a DifferentialTarget")
        if switch_step is None and threshold is None and gate is None:
            raise ValueError(
                "give switch_step, threshold or gate (or several): otherwise it never switches"
            )
        if switch_step is not None:
            check_positive_int("switch_step", switch_step, minimum=0)
        if threshold is not None:
            check_real("threshold", threshold, minimum=0.0, strict=True)
        check_fraction("ema", ema, below_one=True)
        check_positive_int("min_steps", min_steps, minimum=0)
        check_positive_int("blend_steps", blend_steps, minimum=0)
        check_choice("handover", handover, HANDOVERS)
        if gate is not None and not isinstance(gate, SwitchGate):
            raise TypeError(f"gate must be a SwitchGate, got {type(gate).__name__}")
        if guard is not None and not isinstance(guard, SwitchGuard):
            raise TypeError(f"guard must be a SwitchGuard, got {type(guard).__name__}")
        if every is None:
            if gate is not None or guard is not None:
                raise ValueError("a gate or a guard needs every (the cadence of its checks)")
        else:
            check_positive_int("every", every)
        if reduce is not None and not callable(reduce):
            raise TypeError(f"reduce must be callable, got {type(reduce).__name__}")
        self.discrete_target = discrete
        self.differential_target = differential
        self.switch_step, self.threshold, self.ema = switch_step, threshold, float(ema)
        self.min_steps, self.blend_steps, self.handover = min_steps, blend_steps, handover
        self.gate, self.guard, self.every, self.reduce = gate, guard, every, reduce
        self.names = gap_bin_names(edges)
        self._edges = torch.tensor(_check_edges(edges), dtype=torch.float64)
        self.step = 0
        self.switched_at: int | None = None
        self.events: list[tuple[int, str]] = []
        self.gate_streak = 0
        self._fit: Tensor | None = None  # moving average of the fit error (on device)
        self._fit_below_threshold = False
        self._held: dict[str, Any] | None = None  # the guard's held-out batch and reference
        self._guard_streak = 0
        self.signals: AgreementSignals | None = None

    # ------------------------------------------------------------------ state
    @property
    def phase(self) -> str:
        """``"discrete"``, ``"blend"`` or ``"differential"`` at the current step."""
        if self.switched_at is None:
            return "discrete"
        if self.step < self.switched_at + self.blend_steps:
            return "blend"
        return "differential"

    @property
    def fit_error(self) -> float | None:
        """The moving average of the relative fit error on the discrete target (a sync)."""
        return None if self._fit is None else float(self._fit)

    @property
    def reverts(self) -> int:
        return sum(kind == "revert" for _, kind in self.events)

    def blend_weight(self) -> float:
        """Weight of the differential target: 0 before the switch, ramping to 1 over the blend."""
        if self.switched_at is None:
            return 0.0
        if self.blend_steps == 0:
            return 1.0
        return min(1.0, (self.step - self.switched_at + 1) / (self.blend_steps + 1))

    def _locked(self) -> bool:
        """No switch any more: the guard has used its reverts (or a revert without a gate)."""
        if not self.reverts:
            return False
        assert self.guard is not None
        return self.gate is None or self.reverts >= self.guard.max_reverts

    def _due(self) -> bool:
        return self.every is not None and self.step % self.every == 0

    def _sum(self, x: Tensor) -> Tensor:
        if self.reduce is None:
            return x
        out = self.reduce(x)
        return x if out is None else out

    # ------------------------------------------------------------------ call
    def __call__(
        self, student, z_t, r, t, v, *, teacher=None, cond=None, generator=None, step=None
    ) -> TargetOutput:
        self.step = self.step + 1 if step is None else check_positive_int("step", step, minimum=0)
        kwargs = dict(teacher=teacher, cond=cond, generator=generator)
        events: dict[str, float] = {}
        if self.switched_at is None and not self._locked() and self._may_switch():
            self._switch(student, z_t, r, t, v, kwargs)
            events["warmup_switched"] = 1.0
        phase = self.phase
        if phase == "discrete":
            out = self.discrete_target(student, z_t, r, t, v, step=self.step, **kwargs)
            extra = self._watch_discrete(out, student, z_t, r, t, v, cond)
        else:
            out = self.differential_target(student, z_t, r, t, v, **kwargs)
            alpha = self.blend_weight()
            if alpha < 1.0:
                out = self._hand_over(out, alpha, student, z_t, r, t, v, kwargs)
            extra = self._watch_guard(student)
            if self.switched_at is None:
                events["warmup_reverted"] = 1.0
        device = out.target.device
        metrics = dict(out.metrics)
        metrics["warmup_phase"] = torch.full((), float(_PHASES.index(phase)), device=device)
        metrics["warmup_alpha"] = torch.full((), float(self.blend_weight()), device=device)
        if self._fit is not None:
            metrics["warmup_fit_error"] = self._fit
        for k, val in {**extra, **events}.items():
            metrics[k] = torch.full((), float(val), device=device)  # (a fill: no host wait)
        return TargetOutput(out.pred, out.target, metrics)

    def _hand_over(self, out, alpha, student, z_t, r, t, v, kwargs) -> TargetOutput:
        """The target during the hand-over, at differential weight ``alpha`` in ``[0, 1)``."""
        work = out.target.dtype
        if self.handover == "blend":
            disc = self.discrete_target.compute(student, z_t, r, t, v, **kwargs)
            mixed = alpha * out.target + (1.0 - alpha) * disc.to(work)
            return TargetOutput(out.pred, mixed, out.metrics)
        # "gap": the differential target on the intervals up to alpha long; the discrete one
        # integrates only the longer ones (the others are passed as r = t: no solve)
        short = (t.to(torch.float64) - r.to(torch.float64)) <= alpha
        disc = self.discrete_target.compute(student, z_t, torch.where(short, t, r), t, v, **kwargs)
        mixed = torch.where(expand_time(short, z_t), out.target, disc.to(work))
        return TargetOutput(out.pred, mixed, out.metrics)

    def _may_switch(self) -> bool:
        """Whether the step or the threshold allows the switch, and the gate holds."""
        scheduled = self.switch_step is not None and self.step >= self.switch_step
        fitted = (
            self.threshold is not None and self.step >= self.min_steps and self._fit_below_threshold
        )
        if self.gate is None:
            return scheduled or fitted
        ready = scheduled or fitted or (self.switch_step is None and self.threshold is None)
        return ready and self.gate_streak >= self.gate.patience

    def _switch(self, student, z_t, r, t, v, kwargs) -> None:
        self.switched_at = self.step
        self.events.append((self.step, "switch"))
        self._guard_streak = 0
        if self.guard is None:
            return
        keep = self.guard.batch
        cut = slice(None) if keep is None else slice(0, keep)
        z, rr, tt, vv = z_t[cut].detach(), r[cut], t[cut], v[cut]
        cond = _detached(dict(kwargs.get("cond") or {}), keep)
        target = self.discrete_target.compute(
            student, z, rr, tt, vv, teacher=kwargs["teacher"], cond=cond, generator=None
        )
        self._held = {"z": z, "r": rr, "t": tt, "cond": cond, "target": target.detach()}
        err, ref = self._held_error(student)
        self._held["ref"] = err / ref if ref > 0 else 0.0

    def _held_error(self, student) -> tuple[float, float]:
        held = self._held
        assert held is not None
        with torch.no_grad():
            u = student(held["z"], held["r"], held["t"], **held["cond"])
        work = held["target"].dtype
        sums = torch.stack(
            [
                (u.to(work) - held["target"]).pow(2).sum(),
                held["target"].pow(2).sum(),
            ]
        )
        err, ref = self._sum(sums).tolist()
        return err, ref

    def _watch_guard(self, student) -> dict[str, float]:
        if self.guard is None or self._held is None or not self._due():
            return {}
        err, ref = self._held_error(student)
        e = err / ref if ref > 0 else 0.0
        bar = (1.0 + self.guard.margin) * self._held["ref"]
        self._guard_streak = self._guard_streak + 1 if e > bar else 0
        out = {"guard_error": e, "guard_ref": self._held["ref"]}
        if self._guard_streak >= self.guard.patience:
            self.events.append((self.step, "revert"))
            self.switched_at, self._held, self._guard_streak = None, None, 0
            self.gate_streak = 0
        return out

    def _watch_discrete(self, out, student, z_t, r, t, v, cond) -> dict[str, float]:
        """Fit error every step (on device); threshold, signals and gate every ``every``
        steps, from one reduced tensor read to the host once."""
        pred, target = out.pred.detach(), out.target
        work = target.dtype
        err = (pred.to(work) - target).pow(2).sum()
        ref = target.pow(2).sum().clamp_min(1e-12)
        e = (err / ref).to(torch.float32)
        self._fit = e if self._fit is None else self.ema * self._fit + (1.0 - self.ema) * e
        if not self._due():
            return {}
        stats = [torch.stack([self._fit.to(work), torch.ones((), dtype=work, device=e.device)])]
        watch = not self._locked()
        if watch:
            u_diff = self.differential_target.compute(student, z_t, r, t, v, cond=cond)
            edges = self._edges.to(pred.device)
            stats.append(_agreement_sums(pred, target, u_diff, r, t, edges).flatten().to(work))
        host = self._sum(torch.cat(stats)).tolist()
        fit_sum, ranks = host[:2]
        extra: dict[str, float] = {}
        if self.threshold is not None:
            self._fit_below_threshold = fit_sum / ranks < self.threshold
        if watch:
            n = len(self.names)
            sums = [host[2 + i * n : 2 + (i + 1) * n] for i in range(_ROWS)]
            self.signals = AgreementSignals.from_sums(sums, self.names)
            extra |= self.signals.metrics()
            if self.gate is not None:
                holds = self.gate.holds(self.signals)
                self.gate_streak = self.gate_streak + 1 if holds else 0
                extra["gate_streak"] = float(self.gate_streak)
        return extra

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Phase, fit error, gate and guard state, plus the wrapped targets' states."""
        return {
            "step": self.step,
            "switched_at": self.switched_at,
            "fit_error": self._fit,
            "fit_below_threshold": self._fit_below_threshold,
            "events": [[s, k] for s, k in self.events],
            "gate_streak": self.gate_streak,
            "guard_streak": self._guard_streak,
            "held": self._held,
            "discrete": self.discrete_target.state_dict(),
            "differential": self.differential_target.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; raises ``KeyError`` naming a missing entry.

        States written before the gate and guard existed (``step``, ``switched_at``,
        ``fit_error``, ``discrete``, ``differential``) load too.
        """
        for key in ("step", "switched_at", "fit_error", "discrete", "differential"):
            if key not in state:
                raise KeyError(f"WarmupTarget state is missing {key!r}")
        self.step = int(state["step"])
        self.switched_at = state["switched_at"]
        fit = state["fit_error"]
        self._fit = None if fit is None else torch.as_tensor(fit, dtype=torch.float32)
        self._fit_below_threshold = bool(state.get("fit_below_threshold", False))
        self.events = [(int(s), str(k)) for s, k in state.get("events", [])]
        self.gate_streak = int(state.get("gate_streak", 0))
        self._guard_streak = int(state.get("guard_streak", 0))
        self._held = state.get("held")
        self.discrete_target.load_state_dict(state["discrete"])
        self.differential_target.load_state_dict(state["differential"])


# --------------------------------------------------------------------------- rollback


def _clone(state: Any, device: torch.device | str | None) -> Any:
    if isinstance(state, Tensor):
        return state.detach().to(device=device or state.device, copy=True)
    if isinstance(state, dict):
        return {k: _clone(v, device) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_clone(v, device) for v in state)
    return state


def _happened(metrics: Mapping[str, Any], event: str) -> bool:
    """Whether ``metrics`` report ``event`` (present, with a nonzero value)."""
    return event in metrics and float(metrics[event]) != 0.0


class SwitchRollback:
    """Restore the trained weights and the optimiser to the switch when the guard reverts.

    A revert alone leaves the student where the differential phase took it; on the toys a
    guard that caught a blow-up 20 steps after the switch still ended far worse than the
    switch state (docs/toys.md). With a rollback the run continues on the discrete target
    from exactly the state at the switch.

    Call :meth:`observe` with a step's metrics after the loss and *before* the optimiser
    step: at ``warmup_switched`` it copies the optimiser's parameters and state (and the
    states of ``also``, e.g. an EMA of the weights); at ``warmup_reverted`` it writes them
    back and returns ``True``, and the caller then skips this step's update. The copy is
    part of :meth:`state_dict`, so a resumed run can still roll back.

    Args:
        optimizer: the student's optimiser; its parameters are what is restored.
        also: further objects with ``state_dict()`` / ``load_state_dict()`` to restore.
        device: where the copy lives (e.g. ``"cpu"`` to spare accelerator memory; default:
            beside each tensor).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        also: tuple[Any, ...] = (),
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
        for obj in also:
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise TypeError(f"also must hold objects with state_dict(), got {obj!r}")
        self.optimizer, self.also, self.device = optimizer, tuple(also), device
        self.saved: dict[str, Any] | None = None

    def _params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def observe(self, metrics: Mapping[str, Any]) -> bool:
        """Save at a switch, restore at a revert; ``True`` when this step was rolled back.

        An event happened when its key is in ``metrics`` with a nonzero value
        (``{"warmup_reverted": 0.0}`` is no revert).

        Raises:
            TypeError: unless ``metrics`` is a mapping.
        """
        if not isinstance(metrics, Mapping):
            raise TypeError(
                f"metrics must be a mapping (a step's metrics), got {type(metrics).__name__}"
            )
        if _happened(metrics, "warmup_switched"):
            self.saved = {
                "params": _clone(self._params(), self.device),
                "optimizer": _clone(self.optimizer.state_dict(), self.device),
                "also": [_clone(obj.state_dict(), self.device) for obj in self.also],
            }
        if _happened(metrics, "warmup_reverted") and self.saved is not None:
            with torch.no_grad():
                for p, saved in zip(self._params(), self.saved["params"], strict=True):
                    p.copy_(saved)
            self.optimizer.load_state_dict(_clone(self.saved["optimizer"], None))
            for obj, state in zip(self.also, self.saved["also"], strict=True):
                obj.load_state_dict(_clone(state, None))
            self.saved = None
            return True
        return False

    def state_dict(self) -> dict:
        return {"saved": self.saved}

    def load_state_dict(self, state: dict) -> None:
        if "saved" not in state:
            raise KeyError("SwitchRollback state is missing 'saved'")
        self.saved = state["saved"]
