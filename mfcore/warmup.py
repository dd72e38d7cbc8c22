"""The warm-up switch of the seed method, and the signals, gate and guard that make it safe.

The seed paper (arXiv 2605.17834, Sec. 3) trains a MeanFlow student on a *discrete* target
first (the teacher's ODE secant over ``[r, t]``) and then switches to the *differential*
target ``u_tgt = v - (t - r) sg(du/dt)`` (MeanFlow, arXiv 2505.13447, eq. 10). The
differential target is exact at its fixed point, but away from it the stop-gradient term
feeds the student's own derivative error back as a target: a student whose *values* fit
the discrete target can still have a ``du/dt`` that is far off (the discrete target
supervises values, never derivatives), and then the switch undoes the fit (docs/toys.md).

Two signals compare the targets on the same batch, at the cost of one extra JVP every
``every`` steps: ``delta``, how far apart the two targets are, and ``rho``, how far the
differential target points from the discrete one against the student's own fit error
(:mod:`mfcore.switch_signals` defines both, pooled and per gap bin ``t - r``).

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

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from mfcore._checks import (
    check_choice,
    check_fraction,
    check_instance,
    check_positive_int,
    check_real,
    check_state,
)
from mfcore.fields import DiscreteTarget, TargetOutput
from mfcore.path import FlowPoint, expand_time
from mfcore.rollback import SwitchRollback
from mfcore.switch_signals import (
    AGREEMENT_ROWS,
    DEFAULT_GAP_EDGES,
    AgreementSignals,
    SwitchGate,
    SwitchGuard,
    agreement_sums,
    check_gap_edges,
    gap_bin_names,
    target_agreement,
)
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

_PHASES = ("discrete", "blend", "differential")
#: How :class:`WarmupTarget` hands over from the discrete to the differential target.
HANDOVERS = ("blend", "gap")


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
        check_instance("gate", gate, SwitchGate, "a SwitchGate", optional=True)
        check_instance("guard", guard, SwitchGuard, "a SwitchGuard", optional=True)
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
        self._edges = torch.tensor(check_gap_edges(edges), dtype=torch.float64)
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
        self, student, point: FlowPoint, *, teacher=None, generator=None, step=None
    ) -> TargetOutput:
        self.step = self.step + 1 if step is None else check_positive_int("step", step, minimum=0)
        kwargs = dict(teacher=teacher, generator=generator)
        events: dict[str, float] = {}
        if self.switched_at is None and not self._locked() and self._may_switch():
            self._switch(student, point, teacher)
            events["warmup_switched"] = 1.0
        phase = self.phase
        if phase == "discrete":
            out = self.discrete_target(student, point, step=self.step, **kwargs)
            extra = self._watch_discrete(out, student, point)
        else:
            out = self.differential_target(student, point, **kwargs)
            alpha = self.blend_weight()
            if alpha < 1.0:
                out = self._hand_over(out, alpha, student, point, kwargs)
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

    def _hand_over(self, out, alpha, student, point: FlowPoint, kwargs) -> TargetOutput:
        """The target during the hand-over, at differential weight ``alpha`` in ``[0, 1)``."""
        z_t, r, t = point.z, point.r, point.t
        work = out.target.dtype
        if self.handover == "blend":
            disc = self.discrete_target.compute(student, point, **kwargs)
            mixed = alpha * out.target + (1.0 - alpha) * disc.to(work)
            return TargetOutput(out.pred, mixed, out.metrics)
        # "gap": the differential target on the intervals up to alpha long; the discrete one
        # integrates only the longer ones (the others are passed as r = t: no solve)
        short = (t.to(torch.float64) - r.to(torch.float64)) <= alpha
        long_only = replace(point, r=torch.where(short, t, r))
        disc = self.discrete_target.compute(student, long_only, **kwargs)
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

    def _switch(self, student, point: FlowPoint, teacher) -> None:
        self.switched_at = self.step
        self.events.append((self.step, "switch"))
        self._guard_streak = 0
        if self.guard is None:
            return
        keep = self.guard.batch
        cut = slice(None) if keep is None else slice(0, keep)
        held = FlowPoint(
            point.z[cut].detach(), point.r[cut], point.t[cut], point.v[cut],
            _detached(point.cond, keep),
        )  # fmt: skip
        target = self.discrete_target.compute(student, held, teacher=teacher)
        self._held = {
            "z": held.z,
            "r": held.r,
            "t": held.t,
            "cond": held.cond,
            "target": target.detach(),
        }
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

    def _watch_discrete(self, out, student, point: FlowPoint) -> dict[str, float]:
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
            u_diff = self.differential_target.compute(student, point)
            edges = self._edges.to(pred.device)
            sums = agreement_sums(pred, target, u_diff, point.r, point.t, edges=edges)
            stats.append(sums.flatten().to(work))
        host = self._sum(torch.cat(stats)).tolist()
        fit_sum, ranks = host[:2]
        extra: dict[str, float] = {}
        if self.threshold is not None:
            self._fit_below_threshold = fit_sum / ranks < self.threshold
        if watch:
            n = len(self.names)
            sums = [host[2 + i * n : 2 + (i + 1) * n] for i in range(AGREEMENT_ROWS)]
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
        keys = ("step", "switched_at", "fit_error", "discrete", "differential")
        check_state("WarmupTarget", state, keys)
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
