"""One optimiser step of ``mfcore-distill``, over the ranks and micro-batches of a global batch.

Each rank computes its rows of the step's global batch (:class:`~mfcore.adapters.parallel.Split`)
in micro-batches whose gradients accumulate, and the step equals the one-process step on the
global batch at any world size and micro-batch size (up to the order of float sums):

- the MeanFlow loss's noise and times are drawn for the global batch from the run's generator
  (the same state on every rank) and each micro-batch takes its rows;
- the alignment term draws through :class:`~mfcore.draws.BatchRows` from its own generator,
  restored at the start of every micro-batch, so each sees the global batch's draws and the
  generator ends where one process leaves it;
- each micro-batch's mean loss is weighted by ``rows * world / global`` (``Split.weight``), so
  the gradients the ranks average (DDP's all-reduce, FSDP2's reduce-scatter) and accumulate
  are those of the global batch's mean;
- the critic's update accumulates over the micro-batches in the same way and then steps once;
- the warm-up target (switch, gate, guard) watches each step's first micro-batch, its
  statistics summed over the ranks (its ``reduce``), and the step's other micro-batches use
  the target it chose, so every rank takes each decision at the same step;
- logged metrics are the global batch's: row-weighted means, summed over the ranks.

One micro-batch in one process is exactly the step before multi-process runs existed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from mfcore.adapters.alignment import Alignment
from mfcore.adapters.arcflow_objective import ArcFlowObjective
from mfcore.adapters.data import LatentDataset
from mfcore.adapters.distill_config import DistillConfig
from mfcore.adapters.ema import EMA
from mfcore.adapters.family import TrainingFamily
from mfcore.adapters.flux_arcflow import FluxArcFlowStudent
from mfcore.adapters.parallel import Split, World, gradient_sync, release_gathered
from mfcore.adapters.student import MeanFlowStudent, Teacher
from mfcore.draws import BatchRows
from mfcore.losses import MeanFlowLoss
from mfcore.warmup import SwitchRollback, WarmupTarget

__all__ = ["AlignmentHook", "Run", "train_step", "micro_batch_loss", "micro_batch_critic_loss"]


@runtime_checkable
class AlignmentHook(Protocol):
    """A trajectory-alignment term added to the MeanFlow loss (e.g. ``Alignment``).

    ``critic_step`` trains the critic (its own optimiser) on the batch before the student's
    step; ``student_loss`` returns the student's alignment loss (with graph) and metrics;
    the total is ``mean_flow + weight * student_loss``. ``state_dict`` /
    ``load_state_dict`` make it resumable (tensors and plain values only).
    """

    weight: float

    def critic_step(
        self, student: MeanFlowStudent, teacher: Teacher, x: Tensor, cond: dict, step: int
    ) -> dict: ...

    def student_loss(
        self, student: MeanFlowStudent, teacher: Teacher, x: Tensor, cond: dict, step: int
    ) -> tuple[Tensor, dict]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Run:
    """Everything a training step touches (built by the entry point)."""

    cfg: DistillConfig
    family: TrainingFamily
    student: MeanFlowStudent | FluxArcFlowStudent
    teacher: Teacher
    loss: MeanFlowLoss | ArcFlowObjective
    optimizer: torch.optim.Optimizer
    data: LatentDataset
    generator: torch.Generator
    device: torch.device
    alignment: AlignmentHook | None
    scheduler: dict
    vae: nn.Module | None
    world: World
    split: Split
    objective: Callable[..., Any] | None = None  # the student's loss as DDP runs it
    critic_objective: Callable[..., Any] | None = None  # the critic's, likewise
    ema: EMA | None = None
    rollback: SwitchRollback | None = None
    step: int = 0
    preview_reference: Tensor | None = None  # the teacher's preview samples, once computed
    preview_cond: dict | None = None  # the validation prompts' conditions, once encoded
    following: dict[str, MeanFlowLoss] = field(default_factory=dict)  # see _following


class _Means:
    """Row-weighted means of metrics over micro-batches and ranks (a key counts only where
    it was logged: the warm-up's keys come from the first micro-batch)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.num: dict[str, Tensor] = {}
        self.den: dict[str, float] = {}

    def add(self, metrics: dict[str, Any], weight: float) -> None:
        for key, value in metrics.items():
            v = torch.as_tensor(value, dtype=torch.float64, device=self.device) * weight
            self.num[key] = self.num[key] + v if key in self.num else v
            self.den[key] = self.den.get(key, 0.0) + weight

    def result(self, world: World) -> dict[str, Any]:
        keys = sorted(self.num)
        dens = torch.tensor([self.den[k] for k in keys], dtype=torch.float64, device=self.device)
        sums = world.reduce(torch.cat([torch.stack([self.num[k] for k in keys]), dens]))
        values = sums.tolist()
        return {k: values[i] / values[len(keys) + i] for i, k in enumerate(keys)}


def _autocast(run: Run) -> torch.autocast:
    on = run.cfg.autocast and run.device.type == "cuda"
    return torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=on)


def _weighted(loss: Tensor, weight: float) -> Tensor:
    return loss if weight == 1.0 else loss * weight


def micro_batch_loss(
    run: Run,
    loss_fn: MeanFlowLoss,
    x: Tensor,
    cond: dict,
    draws: tuple[Tensor, Tensor, Tensor],
    rows: BatchRows | None,
) -> tuple[Tensor, dict[str, Any]]:
    """One micro-batch's loss (MeanFlow plus the weighted alignment term) and its metrics.

    ``draws`` are its rows of the global noise and times; ``rows`` its rows on the alignment
    term's generator (None for an alignment hook that draws for its batch alone).
    """
    noise, r, t = draws
    loss, metrics = loss_fn(
        run.student,
        x,
        teacher=run.teacher,
        noise=noise,
        cond=cond,
        r=r,
        t=t,
        step=run.step,
        generator=run.generator,
        validate=False,  # the data were checked when read, the times drawn by a library sampler
    )
    metrics = dict(metrics)
    if run.alignment is not None:
        hook, args = run.alignment, (run.student, run.teacher, x, cond, run.step)
        align, more = hook.student_loss(*args, rows) if rows else hook.student_loss(*args)
        loss = loss + hook.weight * align
        metrics |= more
        metrics["loss_total"] = loss.detach()
    return loss, metrics


def micro_batch_critic_loss(run: Run, noise: Tensor, cond: dict, rows: BatchRows) -> Tensor:
    """One micro-batch's loss of one critic update (the fake's flow matching)."""
    return run.alignment.critic_loss(run.student, noise, cond, rows)


def _global_draws(run: Run, sample_shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """Noise ``(G, ...)`` and times ``(G,)`` of the global batch, drawn as
    :class:`~mfcore.losses.MeanFlowLoss` draws them (noise first, then the pair)."""
    total = run.split.total
    kw = {"device": run.device, "dtype": torch.float32}
    noise = torch.randn((total, *sample_shape), generator=run.generator, **kw)
    if run.loss.time_sampler is None:  # a loss that draws its own times (ArcFlow's rollout)
        r = t = torch.zeros(total, **kw)
        return noise, r, t
    r, t = run.loss.time_sampler(total, generator=run.generator, **kw)
    return noise, r, t


def _critic_phase(run: Run, batches: list, parts: list[tuple[int, int]]) -> dict[str, Any]:
    """Train the critic on every micro-batch's trajectory: each update's gradient
    accumulates over the micro-batches (and ranks) before its one optimiser step."""
    hook = run.alignment
    if not isinstance(hook, Alignment):  # a user's hook: one process, one micro-batch
        ((x, cond),) = batches
        with _autocast(run):
            return hook.critic_step(run.student, run.teacher, x, cond, run.step)
    if run.step < hook.start:
        return {}
    gen, total = hook.generator, run.split.total
    rows = [BatchRows(gen, a, b, total) for a, b in parts]
    start = gen.get_state()
    noises = []
    for (x, _), part in zip(batches, rows, strict=True):
        gen.set_state(start)
        noises.append(hook.noise(x, part))
    for _ in range(hook.loss.critic_updates):
        start = gen.get_state()
        hook.optimizer.zero_grad(set_to_none=True)
        means = _Means(run.device)
        for j, ((_, cond), part) in enumerate(zip(batches, rows, strict=True)):
            gen.set_state(start)
            last = j == len(rows) - 1
            with gradient_sync(run.world, run.critic_objective, run.student.transformer, last):
                with _autocast(run):
                    loss = run.critic_objective(run, noises[j], cond, part)
                _weighted(loss, run.split.weight(part.rows)).backward()
            means.add({"critic_fm": loss.detach()}, part.rows / total)
        hook.optimizer.step()
        hook.optimizer.zero_grad(set_to_none=True)
        hook.loss.updates_done += 1
    means.add({"critic_updates": float(hook.loss.updates_done)}, 1.0)
    return means.result(run.world)


def _following(run: Run, first: dict[str, Any]) -> MeanFlowLoss:
    """The loss of a step's later micro-batches: the target the warm-up used on the first,
    without its switch logic (one loss per phase, built at its first use)."""
    target = run.loss.target
    if not isinstance(target, WarmupTarget):
        return run.loss
    phase = "differential" if float(first["warmup_phase"]) > 0 else "discrete"
    if phase not in run.following:
        chosen = target.differential_target if phase == "differential" else target.discrete_target
        run.following[phase] = MeanFlowLoss(run.loss.time_sampler, chosen, run.loss.weighting)
    return run.following[phase]


def _grad_norm(run: Run) -> Tensor:
    norm = torch.nn.utils.clip_grad_norm_(run.student.trainable_parameters(), run.cfg.grad_clip)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _value(metrics: dict[str, Any], key: str) -> float | None:
    return float(metrics[key]) if key in metrics else None


def _data_at(run: Run, x: Tensor, cond: dict, a: int, b: int) -> str:
    """Where the global rows ``[a, b)`` of this step came from (the error path of a
    non-finite loss): each file and row of a non-finite sample, else the files."""
    picked = run.data.indices(run.step, run.split.total, run.cfg.seed)[a:b]
    where = [run.data.index[k] for k in picked]
    inputs = {"latents": x, **cond}
    bad = []
    for key, value in inputs.items():
        if isinstance(value, Tensor) and value.is_floating_point():
            rows = (~torch.isfinite(value)).reshape(value.shape[0], -1).any(1).nonzero()
            bad += [f"{key} of row {where[i][1]} of {run.data.files[where[i][0]]}"
                    for i in rows.flatten().tolist()]  # fmt: skip
    if bad:
        return "non-finite data: " + ", ".join(bad[:8]) + (", ..." if len(bad) > 8 else "")
    files = sorted({run.data.files[i] for i, _ in where})
    return "the data is finite (from " + ", ".join(files) + ")"


def train_step(run: Run) -> dict[str, float | str]:
    """Run one optimiser step (see the module docstring); return its metrics.

    Example:
        A step of two micro-batches (gradients summed before the one optimiser step), on a
        tiny random SD3 and synthetic data:

        >>> import tempfile
        >>> from mfcore.adapters import data, distill, distill_config
        >>> folder = tempfile.mkdtemp()
        >>> _ = data.make_synthetic_data(folder + "/d", family="sd3", num_files=1, per_file=4,
        ...                              height=4, width=4, seq_len=3)
        >>> run = distill.build_run(distill_config.DistillConfig(
        ...     data=folder + "/d", output=folder + "/run", tiny=True, family="sd3", steps=2,
        ...     batch_size=4, micro_batch_size=2, device="cpu", weights_dtype="fp32",
        ...     progress=False, preview_every=0, report_to="none"))
        >>> metrics = train_step(run)
        >>> run.step, metrics["phase"], metrics["loss"] > 0
        (1, 'discrete', True)
    """
    cfg, split = run.cfg, run.split
    parts = split.parts()
    batches = [
        run.data.batch(run.step, split.total, cfg.seed, run.device, rows=slice(a, b))
        for a, b in parts
    ]
    if not run.teacher.validate:  # once here, as the student's and teacher's calls trust them
        for x, cond in batches:
            run.teacher.check_inputs(x, cond)
    noise, r, t = _global_draws(run, tuple(batches[0][0].shape[1:]))
    means = _Means(run.device)
    if run.alignment is not None:
        critic = _critic_phase(run, batches, parts)
        means.add(critic, 1.0)
    mine = isinstance(run.alignment, Alignment)
    gen = run.alignment.generator if mine else None
    start = gen.get_state() if gen is not None else None
    run.optimizer.zero_grad(set_to_none=True)
    loss_fn, rolled_back = run.loss, False
    for j, ((x, cond), (a, b)) in enumerate(zip(batches, parts, strict=True)):
        rows = BatchRows(gen, a, b, split.total) if gen is not None else None
        if gen is not None:
            gen.set_state(start)
        last = j == len(parts) - 1
        with gradient_sync(run.world, run.objective, run.student.transformer, last):
            try:
                with _autocast(run):
                    draws = (noise[a:b], r[a:b], t[a:b])
                    loss, metrics = run.objective(run, loss_fn, x, cond, draws, rows)
                if not bool(torch.isfinite(loss)):
                    # each term checked itself: what is left is their sum, or its scale
                    arc = getattr(run.loss, "phase", None) == "arcflow"
                    what = f"the {'ArcFlow' if arc else 'MeanFlow'} loss"
                    what += " plus the alignment term" if run.alignment else ""
                    raise FloatingPointError(
                        f"{what} is not finite at step {run.step} (align_loss "
                        f"{_value(metrics, 'align_loss')}, weight "
                        f"{getattr(run.alignment, 'weight', None)}; the MeanFlow loss "
                        f"{_value(metrics, 'loss')})"
                    )
            except FloatingPointError as err:
                raise FloatingPointError(f"{err}; {_data_at(run, x, cond, a, b)}") from None
            # the guard reverted (on every rank): back to the switch, no update this step
            rolled_back = j == 0 and run.rollback is not None and run.rollback.observe(metrics)
            if not rolled_back:
                _weighted(loss, split.weight(b - a)).backward()
        means.add(metrics, (b - a) / split.total)
        if rolled_back:
            break
        if j == 0 and len(parts) > 1:
            loss_fn = _following(run, metrics)
    if not rolled_back:
        if math.isfinite(cfg.grad_clip):
            means.add({"grad_norm": _grad_norm(run)}, 1.0)
        run.optimizer.step()
        if run.ema is not None:
            run.ema.update()
    release_gathered(run.student.transformer)  # the next call sees the rollback's weights
    run.step += 1
    out: dict[str, float | str] = dict(means.result(run.world))
    if rolled_back:
        out["rolled_back"] = 1.0
    out["phase"] = getattr(run.loss, "phase", None) or getattr(run.loss.target, "phase", "discrete")
    return out
