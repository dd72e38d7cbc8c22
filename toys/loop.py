"""The toy training loop on a typed run state (:class:`ToyRun`), as the adapters' ``Run``.

A :class:`ToyRun` holds what a run trains (its config, the mixture, the student, the teacher
that counts its evaluations, the random generator, the probe) and what a checkpoint keeps
(the optimiser, the loss's and critics' states, the rollback, the logs, the next step).
:func:`train_step` takes one optimiser step of it and :func:`train` runs it to the end,
probing, checkpointing and stopping at a collapse or a plateau.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mfcore.critics import AlignmentLoss
from mfcore.losses import MeanFlowLoss
from mfcore.path import FlowPoint
from mfcore.solvers import sample_meanflow
from mfcore.warmup import SwitchRollback

from .checkpoints import run_folder, save_checkpoint
from .config import ToyConfig
from .derivative import derivative_loss
from .evaluation import finite_metrics
from .gmm import GaussianMixture
from .probe import AverageVelocityProbe
from .recipe import alignments, discrete_target, mean_flow_loss

__all__ = ["CountingField", "ToyRun", "train_step", "train", "safe_probe"]

logger = logging.getLogger(__name__)

#: Metric prefixes logged at every step that measures them (their own cadence).
_LOGGED = ("agree_", "guard_", "gate_")


class CountingField:
    """A velocity field that counts the points it is evaluated at (teacher NFE x batch), and
    draws the data of the mixture it stands for (``sample``)."""

    def __init__(self, field: Any, mixture: GaussianMixture) -> None:
        self.field, self.points, self.sample = field, 0, mixture.sample

    def __call__(self, z: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        self.points += z.shape[0]
        return self.field(z, t, **cond)


class _History:
    """Per-step scalars, kept every ``every`` steps (for the loss figure), and at every step
    that measured the agreement signals, the gate or the guard (their own cadence)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.rows: list[dict[str, float]] = []

    def add(self, step: int, values: dict[str, float]) -> None:
        if step % self.every == 0 or any(k.startswith(_LOGGED) for k in values):
            self.rows.append({"step": step, **values})


@dataclass(eq=False)
class ToyRun:
    """A toy run: what it trains, and the state its checkpoint holds.

    Attributes:
        cfg: the checked settings.
        mixture: the Gaussian mixture the teacher stands for (data, evaluation).
        student: the MeanFlow network ``u(z, r, t)``.
        teacher: the teacher velocity, counting its evaluations.
        generator: every random draw of the training.
        probe: the exact average-velocity probe.
        loss, aligns, optimizer, rollback: the MeanFlow loss (its warm-up state included),
            the alignment terms, the student's Adam and the switch rollback (or None).
        history, probes, at_switch: the logged scalars, the probe results and the
            evaluation at the switch step.
        step, wall: the next step to run and the training seconds so far.
    """

    cfg: ToyConfig
    mixture: GaussianMixture
    student: nn.Module
    teacher: CountingField
    generator: torch.Generator
    probe: AverageVelocityProbe
    loss: MeanFlowLoss
    aligns: list[AlignmentLoss]
    optimizer: torch.optim.Optimizer
    rollback: SwitchRollback | None
    history: _History
    probes: list[dict[str, Any]] = field(default_factory=list)
    at_switch: dict[str, Any] | None = None
    step: int = 0
    wall: float = 0.0

    @classmethod
    def build(
        cls,
        cfg: ToyConfig,
        mixture: GaussianMixture,
        student: nn.Module,
        teacher: CountingField,
        generator: torch.Generator,
    ) -> ToyRun:
        """A fresh run of ``student`` (built in this order: the probe, the loss, the critics'
        networks, the optimiser, so that the seeded draws are those of every earlier run)."""
        probe = AverageVelocityProbe(mixture, seed=cfg.seed)
        loss, aligns = mean_flow_loss(cfg), alignments(cfg, mixture.dim)
        optimizer = torch.optim.Adam(student.parameters(), lr=cfg.lr)
        rollback = SwitchRollback(optimizer) if cfg.rollback else None
        history = _History(every=max(1, cfg.steps // 500))
        return cls(cfg, mixture, student, teacher, generator, probe, loss, aligns, optimizer,
                   rollback, history)  # fmt: skip

    def state_dict(self, wall: float) -> dict:
        """What a checkpoint holds, with ``wall`` the training seconds so far."""
        return {
            "config": dataclasses.asdict(self.cfg),
            "step": self.step,
            "wall_s": wall,
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss": self.loss.state_dict(),
            "alignments": [align.state_dict() for align in self.aligns],
            "rollback": None if self.rollback is None else self.rollback.state_dict(),
            "rng": {"generator": self.generator.get_state(), "torch": torch.get_rng_state()},
            "teacher_points": self.teacher.points,
            "history": self.history.rows,
            "probes": self.probes,
            "at_switch": self.at_switch,
        }

    def branch(self, state: dict) -> None:
        """Start from another run's checkpoint: its student, optimiser, step, teacher
        evaluations and curves (not its targets' state or random draws)."""
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.teacher.points = state["teacher_points"]
        self.history.rows = list(state["history"])
        # a run stopped at a plateau probed its last step, which this one probes again
        self.probes = [p for p in state["probes"] if p["step"] < state["step"]]
        self.step, self.wall = state["step"], state["wall_s"]

    def load_state_dict(self, state: dict) -> None:
        """Continue from this run's own checkpoint, exactly (random draws included)."""
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss.load_state_dict(state["loss"])
        for align, saved in zip(self.aligns, state["alignments"], strict=True):
            align.load_state_dict(saved)
        if self.rollback is not None:
            self.rollback.load_state_dict(state["rollback"])
        self.generator.set_state(state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        self.teacher.points = state["teacher_points"]
        self.history.rows, self.probes = state["history"], state["probes"]
        self.at_switch, self.step, self.wall = state["at_switch"], state["step"], state["wall_s"]


def _lr_at(cfg: ToyConfig, step: int) -> float:
    """Cosine decay from ``lr`` to ``lr_final`` over the run."""
    frac = step / max(cfg.steps - 1, 1)
    return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1.0 + math.cos(math.pi * frac))


def _progress(cfg: ToyConfig, done: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    name = cfg.name or cfg.preset
    return tqdm(total=cfg.steps, initial=done, desc=name, leave=False, mininterval=0.5)


def _derivative_step(run: ToyRun) -> torch.Tensor:
    """The derivative-supervision loss on a fresh batch of ``r < t`` pairs."""
    cfg, teacher, gen, loss = run.cfg, run.teacher, run.generator, run.loss
    x = teacher.sample(cfg.batch, generator=gen)
    r, t = loss.time_sampler(cfg.batch, dtype=torch.float32, generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    z = (1 - t)[:, None] * x + t[:, None] * noise
    with torch.no_grad():
        v = teacher(z, t)
    target = getattr(loss.target, "discrete_target", None)
    discrete = target if target is not None else discrete_target(cfg)
    u_disc = discrete.compute(run.student, FlowPoint(z, r, t, v), teacher=teacher, generator=gen)
    return derivative_loss(run.student, z, r, t, v, u_disc)


def train_step(run: ToyRun, step: int) -> dict[str, float]:
    """One optimiser step of ``run`` at ``step`` (the MeanFlow loss, the derivative
    supervision and the alignment terms); the scalars it logs."""
    cfg, student, teacher, gen = run.cfg, run.student, run.teacher, run.generator
    x = teacher.sample(cfg.batch, generator=gen)
    loss, metrics = run.loss(student, x, teacher=teacher, step=step, generator=gen)
    values = {"mf_loss": float(loss.detach()), "phase": float(metrics.get("warmup_phase", -1.0))}
    values |= {k: float(v) for k, v in metrics.items() if k.startswith(_LOGGED)}
    if cfg.deriv_weight > 0 and run.loss.target.phase == "discrete":
        d_loss = _derivative_step(run)
        loss = loss + cfg.deriv_weight * d_loss
        values["deriv_loss"] = float(d_loss.detach())
    if run.aligns and step >= cfg.align_start:
        aligned = step >= cfg.align_start + cfg.critic_lead
        for align in run.aligns:
            noise = torch.randn(cfg.align_batch or cfg.batch, x.shape[1], generator=gen)
            # one run of the student serves the critic's update and the student's loss
            traj = align.trajectory(student, noise, grad=aligned)
            critic_loss, _ = align.critic_step(student, noise, generator=gen, trajectory=traj)
            values[f"critic_{align.steps}"] = float(critic_loss)
            if aligned:
                a_loss, a_metrics = align.student_loss(
                    student, noise, teacher=teacher, generator=gen, trajectory=traj
                )
                loss = loss + cfg.align_weight * a_loss / len(run.aligns)
                g_rms = a_metrics.get("align_g_rms", a_loss.detach())
                values[f"align_{align.steps}"] = float(g_rms)
    if run.rollback is not None and run.rollback.observe(metrics):
        values["rolled_back"] = 1.0
        return values
    for group in run.optimizer.param_groups:
        group["lr"] = _lr_at(cfg, step)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
    run.optimizer.step()
    return values


def _quick_eval(run: ToyRun, gen_seed: int) -> dict[str, Any]:
    """1-step W2 (on the evaluation protocol's noise and data) and the probe errors."""
    gen, mixture = torch.Generator().manual_seed(gen_seed), run.mixture
    n = run.cfg.eval_samples
    data = mixture.sample(n, generator=gen)
    mixture.sample(n, generator=gen)  # the data floor's draw: same noise as evaluate_run
    noise = torch.randn(n, mixture.dim, generator=gen)
    try:
        x = sample_meanflow(run.student, noise, 1)
        w2_1 = finite_metrics(x, mixture, data)["w2"]
    except FloatingPointError:
        w2_1 = None
    return {"w2_1": w2_1, "probe": safe_probe(run.probe, run.student)}


def safe_probe(probe, student) -> dict[str, float] | None:
    """The probe's errors of ``student``, or None when one is not finite."""
    errors = probe(student)
    return errors if all(math.isfinite(v) for v in errors.values()) else None


def _plateaued(cfg: ToyConfig, probes: list[dict[str, Any]]) -> bool:
    """Whether the pooled probe error fell by less than ``cfg.stop_plateau`` (a fraction)
    over the last ``cfg.plateau_window`` steps, from twice that step on."""
    window = cfg.plateau_window
    if cfg.stop_plateau is None or probes[-1]["step"] < 2 * window:
        return False
    now = probes[-1]
    before = next((p for p in probes if p["step"] == now["step"] - window), None)
    if before is None:
        return False
    return before["pooled"] - now["pooled"] < cfg.stop_plateau * before["pooled"]


def train(run: ToyRun) -> dict[str, Any]:
    """Train ``run`` from its step to ``cfg.steps`` (or a collapse, or a plateau), probing
    every ``probe_every`` steps and checkpointing every ``save_every``; the ``training``
    entry of ``metrics.json``."""
    cfg, teacher = run.cfg, run.teacher
    bar = _progress(cfg, run.step)
    run_dir = run_folder(cfg)
    collapse, start, converged = None, time.perf_counter(), None
    eval_seed = cfg.seed + 10_000

    def save() -> None:
        wall = run.wall + time.perf_counter() - start
        save_checkpoint(run_dir, run.state_dict(wall))

    def saved(step: int) -> bool:
        return bool(cfg.save_every) and step % cfg.save_every == 0

    try:
        for step in range(run.step, cfg.steps):
            if step == cfg.warmup_steps:
                run.at_switch = {"step": step, **_quick_eval(run, eval_seed)}
            if step % cfg.probe_every == 0:
                run.probes.append(
                    {"step": step, "teacher_points": teacher.points, **run.probe(run.student)}
                )
                if _plateaued(cfg, run.probes):
                    converged = step
                    break
            values = train_step(run, step)
            run.history.add(step, values)
            run.step = step + 1
            if run_dir is not None and saved(run.step):
                save()
            if bar is not None:
                bar.update(1)
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{values['mf_loss']:.3g}")
    except FloatingPointError as err:  # a non-finite loss: the run collapsed
        collapse = f"step {run.step}: {err}"
        logger.warning("training collapsed at %s", collapse)
    finally:
        if bar is not None:
            bar.close()
    if run_dir is not None and collapse is None and not saved(run.step):
        save()  # the end of the run
    run.wall += time.perf_counter() - start
    target = run.loss.target
    events = getattr(target, "events", [])
    signals = getattr(target, "signals", None)
    done = max(run.step, 1)
    return {
        "collapsed": collapse is not None,
        "collapse": collapse,
        "steps_done": run.step,
        "converged_at": converged,
        "switch_step": getattr(target, "switched_at", None)
        or next((s for s, k in events if k == "switch"), None),
        "events": [[s, k] for s, k in events],
        "last_signals": None if signals is None else signals.metrics(),
        "align_start": cfg.align_start + cfg.critic_lead if run.aligns else None,
        "wall_s": run.wall,
        "ms_per_step": 1e3 * run.wall / done,
        "teacher_points": teacher.points,
        "teacher_nfe_per_sample": teacher.points / (cfg.batch * done),
        "at_switch": run.at_switch,
        "probes": run.probes,
        "history": run.history.rows,
    }
