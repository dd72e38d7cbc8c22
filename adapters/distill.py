"""Distil a FLUX or HunyuanImage checkpoint into a few-step MeanFlow student: ``mfcore-distill``.

The seed method, the same for every family: the student
(:class:`~mfcore.adapters.student.MeanFlowStudent`, LoRA plus an interval embedding on the
teacher's own weights) first regresses the teacher's ODE secant over ``[r, t]`` (the
discrete warm-up target), then the differential MeanFlow target ``v - (t - r) du/dt``
(MeanFlow, arXiv 2505.13447, eq. 10), switched by :class:`mfcore.warmup.WarmupTarget` (a
gate before the switch and a guard after it) inside :class:`mfcore.losses.MeanFlowLoss`;
with ``--align fake`` (or ``meanflow``) plus ``align_weight *`` trajectory distribution
alignment of the student's samples through a fake-velocity critic, a second LoRA adapter on
the same base weights (:mod:`mfcore.adapters.alignment`).

Families: ``--family flux|hunyuanimage2|hunyuanimage3``, detected from ``--model``'s config
by default; ``--tiny`` builds a random tiny model of any family.

Data: a folder of ``*.safetensors`` files, each holding ``N >= 1`` samples: ``latents``
``(N, C, H, W)`` (the VAE's, normalised as the pipeline does) and the family's condition
(FLUX: ``prompt_embeds``, ``pooled_prompt_embeds``; HunyuanImage 2.1: ``prompt_embeds``,
``prompt_attention_mask`` and optionally the ByT5 ``prompt_embeds_2`` /
``prompt_attention_mask_2``; HunyuanImage 3.0: ``input_ids``, ``valid_lengths``), optionally
the ``negative_`` ones for two-pass CFG teachers. ``prepare`` writes it from a prompt file
with the family's own encoders; ``make-data`` writes a synthetic one.

Commands::

    mfcore-distill prepare --model PATH --prompts prompts.txt --output DATA
    mfcore-distill train --model PATH --data DATA --output RUN
    mfcore-distill train --tiny --family hunyuanimage2 --data DATA --output RUN --device cpu
    mfcore-distill make-data DIR --family flux
    mfcore-distill generate --student RUN --prompt "a red cat" --steps 1 2 4 --output IMAGES
    torchrun --nproc-per-node 8 -m mfcore.adapters.distill train --model PATH ... --parallel fsdp

Under ``torchrun`` every rank computes its share of each global batch (``--batch-size``) in
micro-batches, with FSDP2 or DDP (``--parallel``), and the step equals the one-process step
on the same global batch (:mod:`mfcore.adapters.step`; docs/distributed.md).

A run writes ``checkpoints/step-XXXXXXX/`` every ``--checkpoint-every`` steps (student
trainable state, EMA, optimiser, warm-up state, RNG states, step; through
``torch.distributed.checkpoint`` under torchrun; each written whole, synced and read back
before older ones are pruned; ``--resume`` continues exactly from the newest that reads back,
refusing changed settings, fewer ``--steps`` and changed data files), ``metrics.jsonl``
(and TensorBoard events when installed), ``previews/`` (the teacher beside the student's
1-, 2- and 4-step samples, from the same noise), and the final student
in ``student/`` (the EMA weights by default; its LoRA loads with the family's diffusers
loader).

Other alignment terms plug in through :class:`AlignmentHook` (``distill(...,
alignment=...)``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from mfcore._checks import check_choice, check_int64, check_positive_int, check_real, cli_int
from mfcore.adapters import sharded_checkpoint
from mfcore.adapters._durable import read_json, replace_folder, write_json
from mfcore.adapters._state import check_entries, load_state, read_tensors, save_state
from mfcore.adapters.alignment import CRITICS, Alignment, FakeVelocity
from mfcore.adapters.arcflow_objective import STUDENTS, build_arcflow
from mfcore.adapters.checkpoint_files import (
    checkpoint_folders,
    checkpoint_name,
    data_difference,
    prune,
)
from mfcore.adapters.data import LatentDataset, make_synthetic_data
from mfcore.adapters.ema import EMA
from mfcore.adapters.family import FAMILIES, TrainingFamily, detect_family, get_family
from mfcore.adapters.generation import decode_latents, generate_latents, seeded_noise
from mfcore.adapters.loading import resolve_model
from mfcore.adapters.lora import LoraSpec
from mfcore.adapters.monitor import RunLog, latents_to_images
from mfcore.adapters.parallel import (
    INTERVAL_MODULE,
    MODES,
    Split,
    World,
    choose_mode,
    full_trained_weights,
    join,
    leave,
    mixed_precision,
    release_gathered,
    shard,
    wrap,
)
from mfcore.adapters.pipeline import add_generate_parser, run_generate
from mfcore.adapters.prepare import add_prepare_parser, run_prepare
from mfcore.adapters.routing import attention_mode_for, enable_gradient_checkpointing
from mfcore.adapters.sharded_checkpoint import Stateful
from mfcore.adapters.step import Run, critic_loss, student_loss, train_step
from mfcore.adapters.student import MeanFlowStudent, Teacher
from mfcore.jvp import JVP_METHODS
from mfcore.losses import AdaptiveWeight, MeanFlowLoss
from mfcore.solvers import ODE_METHODS, sample_teacher
from mfcore.targets import DifferentialTarget, TeacherODETarget
from mfcore.time import GridPairSampler, LogitNormalTime, TimePairSampler
from mfcore.warmup import SwitchGate, SwitchGuard, SwitchRollback, WarmupTarget

__all__ = [
    "SWITCHES",
    "HELP",
    "DistillConfig",
    "AlignmentHook",
    "resolve_family",
    "build_run",
    "distill",
    "latest_checkpoint",
    "build_parser",
    "main",
]

logger = logging.getLogger(__name__)

SWITCHES = ("gated", "fixed", "never")
"""``--switch``: to the differential target once the targets agree (gate) and at
``--warmup-steps`` at the earliest; at ``--warmup-steps`` unconditionally (the paper); or
never (the discrete target throughout)."""

#: The file of a checkpoint that records the data files it was trained on.
_DATA_FILE = "data.json"


# --------------------------------------------------------------------------- config


@dataclass
class DistillConfig:
    """Everything a run depends on (recorded in each checkpoint; see ``train --help``)."""

    data: str
    output: str
    model: str | None = None
    tiny: bool = False
    family: str = "auto"
    tiny_guidance: bool = False
    student: str = "meanflow"
    arc_components: int = 2
    arc_steps: int = 2
    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lora_rank: int = 64
    lora_alpha: float | None = None
    guidance_scale: float = 3.5
    true_cfg_scale: float = 1.0
    switch: str = "gated"
    warmup_steps: int = 200
    warmup_threshold: float | None = None
    warmup_ode_steps: int = 4
    warmup_ode_method: str = "heun"
    signal_every: int = 10
    gate_delta: float = 0.1
    gate_rho: float = 1.5
    gate_patience: int = 3
    guard: bool = True
    guard_margin: float = 0.25
    guard_patience: int = 2
    rollback: bool = True
    jvp: str = "func"
    single_forward: bool = False
    equal_fraction: float = 0.75
    grid_fraction: float = 0.25
    time_mean: float = -0.4
    time_std: float = 1.0
    shift_times: bool = True
    adaptive_p: float = 1.0
    align: str = "none"
    align_weight: float = 0.3
    align_steps: int = 1
    align_start: int = 0
    critic_lead: int = 100
    critic_updates: int = 1
    critic_lr: float = 1e-4
    critic_rank: int = 64
    critic_ode_steps: int = 2
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False
    allow_data_change: bool = False
    seed: int = 0
    device: str = "auto"
    weights_dtype: str = "bf16"
    autocast: bool = True
    gradient_checkpointing: bool = True
    parallel: str = "auto"
    micro_batch_size: int | None = None
    ema: bool = True
    ema_decay: float = 0.999
    preview_every: int = 100
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.model is None) == (not self.tiny):
            raise ValueError("give exactly one of model (a checkpoint folder) and tiny")
        check_choice("family", self.family, ("auto", *FAMILIES))
        positive = (
            "steps",
            "batch_size",
            "lora_rank",
            "warmup_ode_steps",
            "signal_every",
            "gate_patience",
            "guard_patience",
            "checkpoint_every",
            "align_steps",
            "critic_updates",
            "critic_rank",
            "critic_ode_steps",
            "arc_components",
            "arc_steps",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("warmup_steps", "align_start", "critic_lead", "preview_every"):
            check_positive_int(name, getattr(self, name), minimum=0)
        check_positive_int("keep_checkpoints", self.keep_checkpoints)
        check_int64("seed", self.seed)
        if not (isinstance(self.grad_clip, int | float) and self.grad_clip > 0):
            raise ValueError(
                f"grad_clip must be > 0 (inf turns clipping off), got {self.grad_clip!r}"
            )
        _check_device(self.device)
        if self.align not in ("none", *CRITICS):
            raise ValueError(f"align must be one of {('none', *CRITICS)}, got {self.align!r}")
        check_choice("switch", self.switch, SWITCHES)
        check_choice("student", self.student, STUDENTS)
        check_choice("parallel", self.parallel, MODES)
        if self.micro_batch_size is not None:
            check_positive_int("micro_batch_size", self.micro_batch_size)
        check_real("gate_delta", self.gate_delta, minimum=0.0, strict=True)
        check_real("gate_rho", self.gate_rho, minimum=0.0, strict=True)
        check_real("guard_margin", self.guard_margin, minimum=0.0)
        if self.warmup_threshold is not None:
            check_real("warmup_threshold", self.warmup_threshold, minimum=0.0, strict=True)
        check_real("align_weight", self.align_weight, minimum=0.0)
        check_real("guidance_scale", self.guidance_scale)
        check_real("true_cfg_scale", self.true_cfg_scale, minimum=1.0)
        check_real("critic_lr", self.critic_lr, minimum=0.0, strict=True)
        if self.jvp not in JVP_METHODS:
            raise ValueError(f"jvp must be one of {JVP_METHODS}, got {self.jvp!r}")
        if self.weights_dtype not in _DTYPES:
            raise ValueError(f"weights_dtype must be one of {tuple(_DTYPES)}")
        check_real("lr", self.lr, minimum=0.0, strict=True)
        if not check_real("grid_fraction", self.grid_fraction, minimum=0.0) <= 1.0:
            raise ValueError(f"grid_fraction must lie in [0, 1], got {self.grid_fraction!r}")
        if not 0.0 <= check_real("ema_decay", self.ema_decay, minimum=0.0) < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay!r}")


_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
# the sampling grids whose intervals grid_fraction trains (the step counts users sample with)
GRID_STEPS = (1, 2, 4)

# What a checkpoint that predates a setting ran with (before the gate and guard existed the
# switch was fixed and unguarded; before the families every run was FLUX's).
_LEGACY = {"switch": "fixed", "guard": False, "family": "flux", "grid_fraction": 0.0}
# Settings that may differ between a run and its resumption (the EMA shadows the weights
# without steering them; a checkpoint without one starts it from the resumed weights).
_RESUMABLE = {"steps", "resume", "progress", "checkpoint_every", "keep_checkpoints", "output"}
_RESUMABLE |= {"allow_data_change"}
_RESUMABLE |= {"ema", "ema_decay", "preview_every", "tensorboard"}
# (a rollback needs the copy taken at the switch: resumed without one, it waits for the next)
_RESUMABLE |= {"rollback"}
# (how the global batch is computed: the engine and the micro-batches change only float order)
_RESUMABLE |= {"parallel", "micro_batch_size"}
# Settings that only matter with an alignment term.
_ALIGN_ONLY = {f.name for f in dataclasses.fields(DistillConfig)} & {
    "align_weight",
    "align_steps",
    "align_start",
    "critic_lead",
    "critic_updates",
    "critic_lr",
    "critic_rank",
    "critic_ode_steps",
}


# --------------------------------------------------------------------------- alignment hook


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
        self, student: MeanFlowStudent, teacher: Any, x: Tensor, cond: dict, step: int
    ) -> dict: ...

    def student_loss(
        self, student: MeanFlowStudent, teacher: Any, x: Tensor, cond: dict, step: int
    ) -> tuple[Tensor, dict]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# --------------------------------------------------------------------------- training


def _build_loss(
    cfg: DistillConfig, data: LatentDataset, scheduler: dict, world: World
) -> MeanFlowLoss:
    base = LogitNormalTime(cfg.time_mean, cfg.time_std)
    assert data.shapes is not None
    _, h, w = data.shapes["latents"]
    if cfg.shift_times:
        base = data.family.shift_times(base, h, w, scheduler)
    pairs: Any = TimePairSampler(base, equal_fraction=cfg.equal_fraction)
    if cfg.grid_fraction > 0:
        # the intervals the 1-, 2- and 4-step samplers take, on the family's own grid
        grids = tuple(
            data.family.sampling_grid(k, h, w, scheduler=scheduler, dtype=torch.float64)
            for k in GRID_STEPS
        )
        pairs = GridPairSampler(pairs, grids, cfg.grid_fraction)
    return MeanFlowLoss(
        time_sampler=pairs,
        target=_build_target(
            cfg, world.reduce if world.distributed else None, always_call=world.mode == "fsdp"
        ),
        weighting=AdaptiveWeight(p=cfg.adaptive_p),
    )


def _build_target(
    cfg: DistillConfig, reduce: Callable[[Tensor], Tensor] | None, *, always_call: bool = False
) -> TeacherODETarget | WarmupTarget:
    """The discrete warm-up target, behind the switch ``cfg.switch`` asks for; its decisions
    read statistics summed by ``reduce`` (over the ranks of a multi-process run).
    ``always_call``: the teacher is sharded (FSDP2), so every rank calls it alike, whatever
    its pairs (:class:`~mfcore.targets.TeacherODETarget`)."""
    discrete = TeacherODETarget(
        steps=cfg.warmup_ode_steps, method=cfg.warmup_ode_method, always_call=always_call
    )
    if cfg.switch == "never":
        return discrete
    gated = cfg.switch == "gated"
    return WarmupTarget(
        discrete,
        DifferentialTarget(cfg.jvp, single_forward=cfg.single_forward),
        switch_step=cfg.warmup_steps,
        threshold=cfg.warmup_threshold,
        gate=SwitchGate(cfg.gate_delta, cfg.gate_rho, cfg.gate_patience) if gated else None,
        guard=SwitchGuard(cfg.guard_margin, cfg.guard_patience) if cfg.guard else None,
        every=cfg.signal_every,
        reduce=reduce,
    )


def resolve_family(cfg: DistillConfig, transformer: nn.Module | None = None) -> str:
    """The family a run trains: ``cfg.family``, or detected from the checkpoint's config
    (or the given transformer's class); ``--tiny`` without a family builds a FLUX."""
    if cfg.family != "auto":
        found = cfg.family
        if cfg.model is not None and transformer is None:
            with contextlib.suppress(ValueError):  # an unknown class: the loader names it
                found = detect_family(cfg.model)
        if found != cfg.family:
            raise ValueError(
                f"{cfg.model} holds a {get_family(found).label} checkpoint, "
                f"not {get_family(cfg.family).label} (--family {cfg.family})"
            )
        return cfg.family
    if transformer is not None:
        name = type(transformer).__name__
        for fam in FAMILIES:
            if name in get_family(fam).class_names:
                return fam
        raise ValueError(f"transformer is a {name}, which is none of the families {FAMILIES}")
    return detect_family(cfg.model) if cfg.model is not None else "flux"


def build_run(
    cfg: DistillConfig,
    *,
    alignment: AlignmentHook | None = None,
    transformer: nn.Module | None = None,
) -> Run:
    """Everything :func:`distill` trains, built but not trained (no checkpoint is read):
    model, adapters, sharding, optimisers, EMA, data. For benchmarks and tests of a step
    (``train_step(run)``); ``cfg.family`` must be resolved (:func:`resolve_family`).

    Raises:
        ValueError: for a setting the data, the model or the world size cannot run.
    """
    if cfg.student == "arcflow" and cfg.family != "flux":
        raise ValueError(f"--student arcflow runs on FLUX only, not {cfg.family}")
    family: TrainingFamily = get_family(cfg.family)  # type: ignore[assignment]
    data = LatentDataset(cfg.data, family)
    dtype = _DTYPES[cfg.weights_dtype]
    rank, size, device = join(cfg.device)
    vae = None
    if transformer is None and cfg.tiny:
        transformer, scheduler = family.tiny_model(cfg.seed, dtype, cfg.tiny_guidance), {}
    elif transformer is None:
        assert cfg.model is not None
        transformer, scheduler = family.load_model(cfg.model, dtype)
        vae = family.load_vae(cfg.model, dtype) if cfg.preview_every else None
    else:
        family.check_model(transformer)
        scheduler = {}
    data.check_transformer(transformer)
    if (
        not getattr(transformer.config, "guidance_embeds", False)
        and cfg.true_cfg_scale > 1
        and family.negative_key not in data.shapes
    ):
        raise ValueError(f"true_cfg_scale > 1 needs {family.negative_key} in the data")
    world = World(choose_mode(cfg.parallel, size, transformer, device), rank, size, device)
    split = Split(
        cfg.batch_size, cfg.micro_batch_size or max(cfg.batch_size // size, 1), rank, size
    )
    if alignment is not None and (world.distributed or len(split.parts()) > 1):
        raise ValueError(
            "an alignment hook of your own runs in one process without micro-batches: "
            "use cfg.align for multi-process runs and micro_batch_size"
        )
    if cfg.student == "arcflow":
        _check_arcflow(cfg, world, split, alignment)
    if world.mode != "fsdp":  # FSDP2 moves each unit's shards to the device itself
        transformer.to(device)
    loss: Any = None
    if cfg.student == "arcflow":
        _, h, w = data.shapes["latents"]
        grid = family.sampling_grid(cfg.arc_steps, h, w, scheduler=scheduler, device=device)
        student, loss = build_arcflow(cfg, transformer, grid)
    else:
        student = MeanFlowStudent(
            transformer,
            family,
            lora=LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha),
            guidance_scale=cfg.guidance_scale,
            attention=attention_mode_for(cfg.jvp),
        )
    if world.mode != "fsdp":
        student.to(device)
    if cfg.align != "none" and alignment is not None:
        raise ValueError("give either cfg.align or an alignment term, not both")
    fake = _build_fake(cfg, student) if cfg.align != "none" else None
    if cfg.gradient_checkpointing:
        if hasattr(transformer, "enable_gradient_checkpointing"):
            enable_gradient_checkpointing(transformer)
        else:
            logger.info("%s has no gradient checkpointing of its own", type(transformer).__name__)
    teacher = student.teacher(true_cfg_scale=cfg.true_cfg_scale)
    if world.distributed:
        transformer.add_module(INTERVAL_MODULE, student.interval)
    if world.mode == "fsdp":
        shard(student, mixed_precision(dtype))
        if fake is not None:
            fake.track_parameters()
    if fake is not None:
        alignment = _build_alignment(cfg, fake)
    optimizer = torch.optim.AdamW(
        student.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    ema = EMA(student.trainable_parameters(), cfg.ema_decay) if cfg.ema else None
    rollback = None
    if cfg.student == "meanflow" and cfg.switch != "never" and cfg.guard and cfg.rollback:
        # under FSDP2 each rank keeps the copy of its own shards where they live
        keep = None if world.mode == "fsdp" else "cpu"
        rollback = SwitchRollback(optimizer, also=(ema,) if ema is not None else (), device=keep)
    critic = None
    if isinstance(alignment, Alignment):
        critic = wrap(critic_loss, list(alignment.fake.parameters()), world)
    return Run(
        cfg=cfg,
        family=family,
        student=student,
        teacher=teacher,
        loss=loss if loss is not None else _build_loss(cfg, data, scheduler, world),
        optimizer=optimizer,
        data=data,
        generator=generator,
        device=device,
        alignment=alignment,
        scheduler=scheduler,
        vae=vae,
        world=world,
        split=split,
        objective=wrap(student_loss, student.trainable_parameters(), world),
        critic_objective=critic,
        ema=ema,
        rollback=rollback,
    )


def _check_arcflow(cfg: DistillConfig, world: World, split: Split, alignment: Any) -> None:
    """What ``--student arcflow`` cannot run (besides a family other than FLUX), refused
    by name."""
    if cfg.align != "none" or alignment is not None:
        raise ValueError("--student arcflow takes no alignment term (--align none)")
    if world.distributed or len(split.parts()) > 1:
        raise ValueError(
            "--student arcflow runs in one process without micro-batches (its rollout draws "
            "per call): run it without torchrun and --micro-batch-size"
        )


def _build_fake(cfg: DistillConfig, student: MeanFlowStudent) -> FakeVelocity:
    """The critic's fake velocity: a second adapter on the student's transformer (added
    before any sharding, never a copy of the model)."""
    spec = LoraSpec(rank=cfg.critic_rank, target_modules=student.lora_spec.target_modules)
    return FakeVelocity(student, lora=spec)


def _build_alignment(cfg: DistillConfig, fake: FakeVelocity) -> Alignment:
    return Alignment(
        fake,
        critic=cfg.align,
        steps=cfg.align_steps,
        weight=cfg.align_weight,
        lr=cfg.critic_lr,
        critic_updates=cfg.critic_updates,
        ode_steps=cfg.critic_ode_steps,
        start=cfg.align_start,
        critic_lead=cfg.critic_lead,
        seed=cfg.seed + 1,
    )


def _check_device(device: object) -> None:
    """Raise ``ValueError`` unless ``device`` is ``"auto"`` or a device this machine has."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'auto' or a torch device, got {device!r}") from err
    backend = getattr(torch, dev.type, None)
    if dev.type != "cpu" and not (backend is not None and backend.is_available()):
        raise ValueError(f"device {device!r} is not available on this machine")


# --------------------------------------------------------------------------- checkpoints


def _rng_state(run: Run) -> dict:
    state = {"torch": torch.get_rng_state(), "generator": run.generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(run: Run, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    run.generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _stateful(run: Run) -> Stateful:
    """The tensors a multi-process checkpoint shares: weights, optimisers, EMA, rollback."""
    optimizers = {"student": run.optimizer}
    if isinstance(run.alignment, Alignment):
        optimizers["critic"] = run.alignment.optimizer
    return Stateful(run.student.transformer, optimizers, run.ema, run.rollback)


def _own_state(run: Run) -> dict:
    """What each rank of a multi-process run keeps for itself in a checkpoint."""
    align = None
    if isinstance(run.alignment, Alignment):
        align = {
            "updates_done": run.alignment.loss.updates_done,
            "generator": run.alignment.generator.get_state(),
        }
    rng = _rng_state(run)
    return {"step": run.step, "loss": run.loss.state_dict(), "rng": rng, "alignment": align}


def _write_state(run: Run, folder: str) -> None:
    """One process's checkpoint: the trained tensors, and everything else as safetensors
    plus JSON."""
    save_file(
        {k: v.contiguous() for k, v in run.student.trainable_state_dict().items()},
        os.path.join(folder, "student.safetensors"),
    )
    state = {
        "step": run.step,
        "optimizer": run.optimizer.state_dict(),
        "loss": run.loss.state_dict(),
        "rng": _rng_state(run),
        "alignment": run.alignment.state_dict() if run.alignment is not None else None,
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "rollback": run.rollback.state_dict() if run.rollback is not None else None,
    }
    save_state(state, os.path.join(folder, "state"))


def _save_checkpoint(run: Run) -> str:
    """Write the checkpoint of ``run.step`` (whole, synced, renamed into place), read it back,
    and only then prune the older ones: the newest verified checkpoint stays until its
    successor is verified. One that does not read back is renamed ``<name>.unverified``,
    with a warning, and the run goes on."""
    world = run.world
    root = os.path.join(run.cfg.output, "checkpoints")
    final = os.path.join(root, checkpoint_name(run.step))
    tmp = final + ".tmp"
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    world.barrier()
    if world.distributed:
        sharded_checkpoint.save(tmp, _stateful(run), _own_state(run), world)
    else:
        _write_state(run, tmp)
    # (each rank's files are synced by their writers, DCP's and save_state; rank 0 syncs the
    # whole folder again before the rename)
    world.barrier()
    if world.main:
        settings = dataclasses.asdict(run.cfg)  # (--grad-clip inf: read back by Python)
        write_json(os.path.join(tmp, "config.json"), settings, indent=2, allow_nan=True)
        write_json(os.path.join(tmp, _DATA_FILE), {"files": run.data.fingerprint()})
        replace_folder(tmp, final)
        try:
            _verify(final, world.rank)
        except Exception as err:  # any failure to read back: the other ranks wait at the barrier
            logger.warning("%s does not read back (%s): the older ones stay", final, err)
            shutil.rmtree(final + ".unverified", ignore_errors=True)
            os.replace(final, final + ".unverified")
        else:
            prune(root, run.cfg.keep_checkpoints)
    world.barrier()
    return final


def latest_checkpoint(output: str | os.PathLike) -> str | None:
    """The newest checkpoint folder of a run (by step number), or None."""
    folders = checkpoint_folders(os.path.join(output, "checkpoints"))
    return folders[-1][1] if folders else None


def _check_finite(tensors: dict[str, Tensor], where: str) -> None:
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise ValueError(f"{where} holds non-finite values in {bad[:3]}")


def _verify(path: str, rank: int) -> dict:
    """Read a checkpoint whole without applying it: the saved step, settings and data
    fingerprint, and its student and state (one process) or ``rank``'s file and the DCP
    metadata (several). Raises ``ValueError`` or ``FileNotFoundError`` naming the file (and
    key) at fault: a missing or corrupt file, a missing entry, non-finite weights."""
    config = os.path.join(path, "config.json")
    found = {"config": read_json(config, "checkpoint file"), "data": None}
    check_entries(found["config"], ("steps",), config)
    data = os.path.join(path, _DATA_FILE)
    if os.path.exists(data):  # (checkpoints before the record have none)
        record = read_json(data, "checkpoint file")
        check_entries(record, ("files",), data)
        found["data"] = record["files"]
    if sharded_checkpoint.is_sharded(path):
        own = load_state(sharded_checkpoint.rank_stem(path, rank))
        check_entries(own, ("world_size", "rank", "shared", "own"), path)
        check_entries(own["own"], ("step", "loss", "rng", "alignment"), path)
        sharded_checkpoint.read_metadata(path)
        found["step"] = int(own["own"]["step"])
        return found
    student = os.path.join(path, "student.safetensors")
    found["student"] = read_tensors(student)
    _check_finite(found["student"], student)
    state = load_state(os.path.join(path, "state"))
    check_entries(state, ("step", "optimizer", "loss", "rng", "alignment"), path)
    if state.get("ema") is not None:
        check_entries(state["ema"], ("shadow",), path)
        _check_finite(dict(enumerate(state["ema"]["shadow"])), f"{path}/state (EMA)")
    found["state"], found["step"] = state, int(state["step"])
    return found


def _agreed(run: Run, ok: bool) -> bool:
    """Whether ``ok`` holds on every rank (ranks must resume from the same checkpoint)."""
    if not run.world.distributed:
        return ok
    flag = torch.tensor([float(ok)], device=run.device)
    return int(run.world.reduce(flag).item()) == run.world.size


def _resume_point(run: Run) -> tuple[str, dict]:
    """The newest checkpoint of the run that reads back whole on every rank, and what
    :func:`_verify` read; a corrupt newer one is skipped with a warning naming it, and set
    aside as ``<name>.corrupt`` (so pruning, which keeps the newest, never keeps it in place
    of the intact ones)."""
    root = os.path.join(run.cfg.output, "checkpoints")
    folders = checkpoint_folders(root)
    if not folders:
        raise FileNotFoundError(f"--resume given but {run.cfg.output} has no checkpoint")
    skipped, rejected = [], []
    for _, path in reversed(folders):
        try:
            found, ok = _verify(path, run.world.rank), True
        except Exception as err:  # any failure on one rank: every rank must hear of it
            found, ok = {}, False
            skipped.append(f"{path}: {err}")
        if _agreed(run, ok):
            for reason in skipped:
                logger.warning("skipping a corrupt checkpoint, %s", reason)
            if run.world.main:
                for bad in rejected:
                    shutil.rmtree(bad + ".corrupt", ignore_errors=True)
                    os.replace(bad, bad + ".corrupt")
            run.world.barrier()
            return path, found
        rejected.append(path)
    raise ValueError(f"no checkpoint in {root} reads back whole: " + "; ".join(skipped))


def _check_resume(cfg: DistillConfig, path: str, found: dict, data: LatentDataset) -> None:
    """Raise ``ValueError`` unless ``cfg`` may continue checkpoint ``path``: the same
    settings, steps left to train (or the same count: a warning), the same data files (or a
    warning with ``--allow-data-change``)."""
    _check_settings(cfg, path, found["config"])
    step = found["step"]
    if cfg.steps < step:
        raise ValueError(
            f"--steps {cfg.steps} is below the step {step} of checkpoint {path}: "
            f"pass --steps above {step} to train on, or use its exported student/"
        )
    if cfg.steps == step:
        logger.warning("%s is at --steps %d already: nothing to train, exporting it", path, step)
    if found["data"] is None:
        logger.info("%s records no data fingerprint (older checkpoint): not compared", path)
        return
    diff = data_difference(found["data"], data.fingerprint())
    if diff and not cfg.allow_data_change:
        raise ValueError(
            f"the data folder {data.folder} changed since checkpoint {path} ({diff}): "
            "restore it, or pass --allow-data-change to resume anyway"
        )
    if diff:
        logger.warning("the data folder %s changed since %s: %s", data.folder, path, diff)


def _filled(saved: dict) -> dict:
    """A checkpoint's settings, every field present: a setting added after the checkpoint was
    written had its default then, or the value that reproduces what the code did before it
    existed (``_LEGACY``); keys no longer settings are dropped."""
    defaults = {f.name: f.default for f in dataclasses.fields(DistillConfig)} | _LEGACY
    return {k: saved.get(k, v) for k, v in defaults.items()}


def saved_settings(output: str | os.PathLike) -> tuple[str, dict]:
    """The newest checkpoint of the run in ``output`` whose ``config.json`` reads, and its
    settings (every field of :class:`DistillConfig`).

    Raises:
        FileNotFoundError: when ``output`` holds no checkpoint with readable settings.
    """
    reasons = []
    for _, path in reversed(checkpoint_folders(os.path.join(output, "checkpoints"))):
        try:
            return path, _filled(read_json(os.path.join(path, "config.json")))
        except (ValueError, FileNotFoundError) as err:
            reasons.append(str(err))
    why = f" ({'; '.join(reasons)})" if reasons else ""
    raise FileNotFoundError(f"--resume given but {output} has no checkpoint{why}")


def _check_settings(cfg: DistillConfig, path: str, saved: dict) -> None:
    """Raise ``ValueError`` naming every setting ``cfg`` changes from checkpoint ``path``'s
    (``saved``, its ``config.json``)."""
    now = dataclasses.asdict(cfg)
    saved = _filled(saved)
    ignored = set(_RESUMABLE) | (_ALIGN_ONLY if now["align"] == "none" else set())
    changed = sorted(k for k in now if k not in ignored and saved[k] != now[k])
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"cannot resume {path} with different settings ({diffs})")


def _load_checkpoint(run: Run, path: str, found: dict) -> None:
    """Apply checkpoint ``path`` (read by :func:`_verify` into ``found``) to ``run``."""
    if sharded_checkpoint.is_sharded(path) != run.world.distributed:
        kind = "several processes" if run.world.distributed else "one process"
        raise ValueError(f"{path} was not written by a run of {kind}: resume it as it ran")
    if run.world.distributed:
        own = sharded_checkpoint.load(path, _stateful(run), run.world)
        run.loss.load_state_dict(own["loss"])
        _restore_rng(run, own["rng"])
        if isinstance(run.alignment, Alignment):
            run.alignment.loss.updates_done = int(own["alignment"]["updates_done"])
            run.alignment.generator.set_state(own["alignment"]["generator"])
        run.step = int(own["step"])
        return
    device = str(run.device)
    run.student.load_trainable_state_dict({k: v.to(device) for k, v in found["student"].items()})
    state = found["state"]
    run.optimizer.load_state_dict(state["optimizer"])
    run.loss.load_state_dict(state["loss"])
    _restore_rng(run, state["rng"])
    if run.alignment is not None:
        if state["alignment"] is None:
            raise ValueError(f"{path} was saved without an alignment term")
        run.alignment.load_state_dict(state["alignment"])
    if run.ema is not None and state.get("ema") is not None:
        run.ema.load_state_dict(state["ema"])
    elif run.ema is not None:  # a checkpoint without an EMA: start it from the weights
        logger.info("%s holds no EMA: the average starts from the resumed weights", path)
        run.ema.reset()
    if run.rollback is not None and state.get("rollback") is not None:
        run.rollback.load_state_dict(state["rollback"])
    run.step = int(state["step"])


# --------------------------------------------------------------------------- driver


#: Euler steps of the teacher's preview samples (FLUX's pipeline default).
PREVIEW_TEACHER_STEPS = 28
#: The student's step counts in a preview.
PREVIEW_STEPS = (1, 2, 4)


def _preview(run: Run, log: RunLog | None) -> None:
    """``previews/step-XXXXXXX.png``: one row per preview sample (the data's first two
    conditions), its teacher sample (:data:`PREVIEW_TEACHER_STEPS` Euler steps, computed at
    the first preview and kept) and the (EMA) student's 1-, 2- and 4-step samples, all from
    the same noise. Every rank samples, as the sharded model needs; rank 0 writes them."""
    x, cond = run.data.take(list(range(min(2, len(run.data)))), run.device)
    _, c, h, w = x.shape
    if run.preview_reference is None:
        noise = seeded_noise((x.shape[0], c, h, w), run.cfg.seed, run.device, torch.float32)
        grid = run.family.sampling_grid(
            PREVIEW_TEACHER_STEPS, h, w, scheduler=run.scheduler, device=run.device
        )
        run.preview_reference = sample_teacher(run.teacher, noise, grid=grid, cond=cond)
    columns = [run.preview_reference]
    ema = run.ema.applied() if run.ema is not None else contextlib.nullcontext()
    with ema:
        for steps in PREVIEW_STEPS:
            columns.append(
                generate_latents(
                    run.student,
                    cond,
                    height=h,
                    width=w,
                    steps=steps,
                    seed=run.cfg.seed,
                    scheduler=run.scheduler,
                )  # fmt: skip
            )
        release_gathered(run.student.transformer)  # gathered with the EMA's weights
    if log is not None:
        images = [latents_to_images(z) if run.vae is None else decode_latents(run.vae, z)
                  for z in columns]  # fmt: skip
        log.table(run.step, [list(row) for row in zip(*images, strict=True)])


# the step the loop runs (a test replaces it to kill a run mid-way)
_train_step = train_step


def distill(
    cfg: DistillConfig,
    *,
    alignment: AlignmentHook | None = None,
    transformer: nn.Module | None = None,
) -> MeanFlowStudent:
    """Run (or resume) a distillation and return the student; see the module docstring.

    With ``cfg.ema`` the returned student holds the EMA of its trained weights, as the
    exported ``student/`` folder does. Under ``torchrun`` every rank calls it (the CLI does):
    it opens the process group (or uses one already open), each rank computes its share of
    every global batch, and rank 0 logs and writes the exported student.

    Args:
        cfg: the run's settings.
        alignment: optional trajectory-alignment term (:class:`AlignmentHook`; one process).
        transformer: an already built transformer to use instead of ``cfg.model``.
    """
    cfg = dataclasses.replace(cfg, family=resolve_family(cfg, transformer))
    run = build_run(cfg, alignment=alignment, transformer=transformer)
    main = run.world.main
    if cfg.resume:
        path, found = _resume_point(run)
        _check_resume(cfg, path, found, run.data)
        _load_checkpoint(run, path, found)
        logger.info("resumed from %s at step %d", path, run.step)
    elif latest_checkpoint(cfg.output) is not None:
        raise FileExistsError(
            f"{cfg.output} already holds checkpoints: pass --resume or another --output"
        )
    run.world.barrier()  # every rank has looked for checkpoints before any is written
    log = None
    if main:
        logger.info(
            "distilling %s (%s) on %d samples of %s into %s: steps %d to %d, %d process%s%s",
            run.family.label, cfg.model or "a tiny random model", len(run.data), cfg.data,
            cfg.output, run.step, cfg.steps, run.world.size,
            "es" if run.world.size > 1 else "", f" ({run.world.mode})" if run.world.size > 1
            else "",
        )  # fmt: skip
        os.makedirs(cfg.output, exist_ok=True)
        log = RunLog(cfg.output, run.step, tensorboard=cfg.tensorboard)
    shown = cfg.progress and main
    bar = tqdm(total=cfg.steps, initial=run.step, disable=not shown, desc="distil")
    try:
        while run.step < cfg.steps:
            metrics = _train_step(run)
            if log is not None:
                log.metrics(run.step, metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4g}", phase=metrics["phase"])
            if run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps:
                if log is not None:
                    log.sync()  # the metrics up to a checkpoint outlive a crash as it does
                _save_checkpoint(run)
            if cfg.preview_every and (run.step % cfg.preview_every == 0 or run.step == cfg.steps):
                _preview(run, log)
    finally:
        bar.close()
        if log is not None:
            log.close()
    if run.ema is not None:
        run.ema.copy_to_params()
    with full_trained_weights(run.student.transformer, run.world):
        if main:
            _export(run.student, os.path.join(cfg.output, "student"))
    run.world.barrier()
    return run.student


def _export(student: MeanFlowStudent, folder: str) -> None:
    """Write the student to ``folder`` whole (synced, swapped in).

    Raises:
        FloatingPointError: when the weights are not finite; ``folder`` is left as it was
            (a previous run's student is not overwritten), and the run fails rather than
            ending as if it had exported.
    """
    try:
        _check_finite(student.trainable_state_dict(), "the trained student")
    except ValueError as err:
        raise FloatingPointError(f"{err}: not exported, {folder} is left as it was") from None
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    replace_folder(tmp, folder)


# --------------------------------------------------------------------------- command line

_FORMATTER = argparse.ArgumentDefaultsHelpFormatter

#: The help text of every ``train`` flag (the parser adds each default).
HELP: dict[str, str] = {
    "family": "model family; auto detects it from the checkpoint's config (--tiny: flux)",
    "tiny_guidance": "give the --tiny model a guidance embedding (guidance-distilled)",
    "steps": "optimiser steps in total (a resumed run continues up to it)",
    "batch_size": "samples per step (the global batch, over every rank)",
    "lr": "AdamW learning rate of the student's LoRA and interval embedding",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "clip the gradient norm to this (inf: no clipping)",
    "lora_rank": "rank of the student's LoRA updates",
    "lora_alpha": "LoRA alpha (the update is scaled by alpha / rank; default: rank)",
    "guidance_scale": "guidance input of a guidance-distilled teacher",
    "true_cfg_scale": "two-pass classifier-free guidance scale of the teacher (1: off; "
    "needs negative prompts in the data)",
    "switch": "when to leave the discrete warm-up target: gated (once the targets agree, "
    "not before --warmup-steps), fixed (at --warmup-steps) or never",
    "warmup_steps": "steps of the discrete (teacher-ODE) warm-up target at least",
    "warmup_threshold": "also switch once the warm-up fit error falls below this",
    "warmup_ode_steps": "teacher ODE steps of the warm-up target",
    "warmup_ode_method": "ODE method of the warm-up target",
    "signal_every": "measure the targets' agreement (gate and guard) every N steps",
    "gate_delta": "gate: the targets' relative disagreement must fall below this",
    "gate_rho": "gate: the differential/discrete error ratio must fall below this",
    "gate_patience": "gate: measurements in a row that must pass",
    "guard": "revert to the warm-up target if the differential target diverges",
    "guard_margin": "guard: relative rise of the held-out error that counts as a failure",
    "guard_patience": "guard: failures in a row before reverting",
    "rollback": "on a revert, also restore the weights, optimiser and EMA saved at the switch",
    "jvp": "how du/dt is taken: func (forward AD), autograd (double backward) or fd",
    "single_forward": "take du/dt and the loss's forward in one pass (no checkpointing then)",
    "equal_fraction": "fraction of (r, t) pairs with r = t (flow matching)",
    "grid_fraction": "fraction of (r, t) pairs that are intervals of the 1-, 2- and 4-step "
    "sampling grids (the maps a few-step student is used for)",
    "time_mean": "mean of the logit-normal time sampler",
    "time_std": "standard deviation of the logit-normal time sampler",
    "shift_times": "shift the sampled times as the family's schedule shifts",
    "adaptive_p": "power p of MeanFlow's adaptive loss weight (ArcFlow's too)",
    "student": "meanflow: the average velocity u(z, r, t) (the seed method); arcflow: "
    "ArcFlow's momentum mixture on FLUX (arXiv 2602.09014; one process; --warmup-steps is its "
    "teacher-mixing phase; the target, switch, guard and alignment settings do not apply)",
    "arc_components": "--student arcflow: momentum components K",
    "arc_steps": "--student arcflow: steps of the rollout it is trained on (its NFE)",
    "align": "trajectory alignment critic: none, fake (velocity) or meanflow",
    "align_weight": "weight lambda of the alignment loss",
    "align_steps": "student steps of the aligned trajectory",
    "align_start": "first step with critic updates",
    "critic_lead": "critic-only steps before the student feels the alignment",
    "critic_updates": "critic updates per student update",
    "critic_lr": "AdamW learning rate of the critic's LoRA",
    "critic_rank": "rank of the critic's LoRA",
    "critic_ode_steps": "Heun steps of the mean-flow critic's transports",
    "checkpoint_every": "write a checkpoint every N steps",
    "keep_checkpoints": "checkpoints to keep (the newest; an older one goes only once its "
    "successor reads back whole)",
    "resume": "continue from the newest checkpoint in --output that reads back whole "
    "(a corrupt newer one is skipped with a warning), with the run's saved settings: flags "
    "given again override those a resume may change",
    "allow_data_change": "with --resume, go on (with a warning) when the data folder's files "
    "differ from the checkpoint's record",
    "seed": "seed of the model init (--tiny), data order, noise and times",
    "device": "auto (cuda if available), cpu, cuda, cuda:1, ...",
    "weights_dtype": "dtype of the frozen base weights (trained weights are fp32)",
    "autocast": "bf16 autocast on CUDA",
    "gradient_checkpointing": "recompute blocks in the backward to save memory",
    "parallel": "multi-process engine under torchrun: ddp (weights replicated), fsdp "
    "(FSDP2, sharded), none (one process) or auto (ddp when the weights take at most a "
    "quarter of one device's memory, else fsdp; none without torchrun)",
    "micro_batch_size": "samples per rank per forward; gradients accumulate over the "
    "batch_size / (world size x micro_batch_size) micro-batches of a step (default: the "
    "rank's whole share, batch_size / world size)",
    "ema": "keep an EMA of the trained weights (used for previews and the exported student)",
    "ema_decay": "EMA decay (warmed up as min(decay, (1 + n) / (10 + n)))",
    "preview_every": "every N steps (0: never) write previews/step-N.png: per preview sample, "
    "the teacher's 28-step sample and the student's 1-, 2- and 4-step ones from its noise",
    "tensorboard": "also log to TensorBoard (<output>/tensorboard) when it is installed",
    "progress": "show a progress bar",
}


# The type of the flags whose default is None.
_OPTIONAL = {"lora_alpha": float, "warmup_threshold": float, "micro_batch_size": cli_int}
# the settings with a fixed set of values: argparse lists them in --help and refuses others
_CHOICES: dict[str, tuple[str, ...]] = {
    "family": ("auto", *FAMILIES),
    "student": STUDENTS,
    "switch": SWITCHES,
    "warmup_ode_method": ODE_METHODS,
    "jvp": JVP_METHODS,
    "align": ("none", *CRITICS),
    "weights_dtype": tuple(_DTYPES),
    "parallel": MODES,
}
# (a parser whose every train default is this tells which flags the command line gave)
_NOT_GIVEN = object()


def _add_train(sub: Any, given_only: bool = False) -> None:
    tr = sub.add_parser(
        "train", help="distil a checkpoint into a MeanFlow student", formatter_class=_FORMATTER
    )
    unset = {"default": _NOT_GIVEN} if given_only else {}
    src = tr.add_mutually_exclusive_group()
    src.add_argument(
        "--model",
        help="local diffusers checkpoint folder (pipeline or transformer); this or --tiny "
        "(with --resume: the run's own)",
        **unset,
    )
    src.add_argument("--tiny", action="store_true", help="a random tiny model (tests, smoke runs)",
                     **unset)  # fmt: skip
    tr.add_argument("--data", help="folder of *.safetensors samples (with --resume: the run's "
                    "own)", **unset)  # fmt: skip
    tr.add_argument("--output", required=True, help="run folder (checkpoints, metrics, student)")
    defaults = DistillConfig(data="", output="", tiny=True)
    for field in dataclasses.fields(DistillConfig):
        if field.name in ("data", "output", "model", "tiny"):
            continue
        flag = "--" + field.name.replace("_", "-")
        value = getattr(defaults, field.name)
        kw: dict[str, Any] = {"default": _NOT_GIVEN if given_only else value}
        kw["help"] = HELP[field.name]
        if field.name in _CHOICES:
            kw["choices"] = _CHOICES[field.name]
        if isinstance(value, bool):
            tr.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif field.name in _OPTIONAL:
            tr.add_argument(flag, type=_OPTIONAL[field.name], **kw)
        else:
            kind = cli_int if isinstance(value, int) else type(value)
            tr.add_argument(flag, type=kind, **kw)


def _add_make_data(sub: Any) -> None:
    md = sub.add_parser(
        "make-data", help="write a synthetic data folder", formatter_class=_FORMATTER
    )
    md.add_argument("folder", help="output folder")
    md.add_argument("--family", default="flux", help=f"whose data: one of {tuple(FAMILIES)}")
    md.add_argument(
        "--tiny",
        action="store_true",
        help="data for train --tiny: sizes it would refuse are an error even with other widths "
        "(without it they are an error only with the tiny model's widths, else a warning)",
    )
    sizes = {
        "num_files": (2, "files to write"),
        "per_file": (2, "samples per file"),
        "channels": (None, "latent channels (default: the tiny model's)"),
        "height": (8, "latent height"),
        "width": (8, "latent width"),
        "seq_len": (8, "prompt length in tokens"),
    }
    for name, (value, text) in sizes.items():
        md.add_argument("--" + name.replace("_", "-"), type=cli_int, default=value, help=text)
    for name in ("joint_attention_dim", "pooled_projection_dim", "text_embed_dim", "vocab_size"):
        md.add_argument(
            "--" + name.replace("_", "-"),
            type=cli_int,
            default=None,
            help=f"the condition's {name} (default: the family's tiny model's)",
        )
    md.add_argument("--negatives", action="store_true", help="also write negative prompts")
    md.add_argument("--seed", type=cli_int, default=0, help="seed of the random values")


def build_parser(prog: str = "mfcore-distill", given_only: bool = False) -> argparse.ArgumentParser:
    """The ``train``, ``prepare``, ``make-data`` and ``generate`` command line
    (``given_only``: every ``train`` default a marker, to tell which flags a command line
    gives)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub, given_only)
    add_prepare_parser(sub, _FORMATTER)
    _add_make_data(sub)
    add_generate_parser(sub, _FORMATTER)
    return parser


def _check_trainable(args: dict[str, Any], tiny: bool) -> None:
    """Refuse ``make-data`` sizes that ``train --tiny`` would refuse: one sample of them goes
    through the data checks and one call of the family's tiny teacher first.

    Sizes for the tiny model (its channels and condition widths, or ``--tiny``) that fail
    are a ``ValueError``; other widths are for another model, so the failure only warns.
    """
    family = get_family(args.get("family", "flux"))
    dry = {**args, "num_files": 1, "per_file": 1, "negatives": False}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            make_synthetic_data(tmp, **dry)
            data = LatentDataset(tmp, family)
            model = family.tiny_model(0, torch.float32, False)
            data.check_transformer(model)
            x, cond = data.batch(0, 1, 0, "cpu")
            with torch.no_grad():
                Teacher(model, family)(x, torch.full((1,), 0.5), **cond)
    except (ValueError, TypeError, RuntimeError, IndexError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        widths = set(args) & {"channels", *family.tiny_dims}
        if tiny or not widths:
            raise ValueError(
                f"make-data: train --tiny would refuse {family.label} data of these sizes: {reason}"
            ) from None
        logger.warning("train --tiny would refuse this data (%s); fine for a model of these "
                       "widths (%s)", reason, ", ".join(sorted(widths)))  # fmt: skip


def _make_data(args: dict[str, Any]) -> str:
    tiny = args.pop("tiny")
    folder = args.pop("folder")
    args = {k: v for k, v in args.items() if v is not None}
    _check_trainable(args, tiny)
    paths = make_synthetic_data(folder, **args)
    return f"wrote {len(paths)} files to {folder}\n"


def _train_settings(args: dict[str, Any], argv: Sequence[str] | None, prog: str) -> dict:
    """The settings of ``train``: the command line's; with ``--resume``, the run's saved
    settings with the flags the command line gave on top (a changed setting that a resume
    may not change is then refused by name, as any)."""
    if not args["resume"]:
        if args["data"] is None or (args["model"] is None and not args["tiny"]):
            raise ValueError("train needs --data and one of --model and --tiny")
        return args
    given_parser = build_parser(prog, given_only=True)
    given = vars(given_parser.parse_args(sys.argv[1:] if argv is None else argv))
    given = {k: v for k, v in given.items() if v is not _NOT_GIVEN and k != "command"}
    path, saved = saved_settings(args["output"])
    if "model" in given or "tiny" in given:  # one source of the model: the given one
        saved.pop("model"), saved.pop("tiny")
    merged = {**saved, **given, "resume": True}
    merged.setdefault("model", None)
    merged.setdefault("tiny", False)
    logger.info(
        "resuming with the settings of %s%s", path,
        f"; given: {', '.join(sorted(set(given) - {'resume', 'output'}))}" if given else "",
    )  # fmt: skip
    return merged


def main(argv: Sequence[str] | None = None, *, prog: str = "mfcore-distill") -> int:
    """Entry point; bad input ends with an argparse error naming what is wrong."""
    parser = build_parser(prog)
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    done = False
    try:
        if args.get("model") is not None:
            args["model"] = resolve_model(args["model"])
        if command == "make-data":
            sys.stdout.write(_make_data(args))
        elif command == "prepare":
            sys.stdout.write(run_prepare(args))
        elif command == "generate":
            sys.stdout.write(run_generate(args))
        else:
            cfg = DistillConfig(**_train_settings(args, argv, prog))
            distill(cfg)
            student = os.path.join(cfg.output, "student")
            sys.stdout.write(
                f"wrote the student to {student}; images from it: {prog} generate --student "
                f"{cfg.output} " + ("--data DATA" if cfg.tiny else '--prompt "..."')
                + " --steps 1 2 4 --output IMAGES\n"
            )  # fmt: skip
        done = True
    except (TypeError, ValueError, FileNotFoundError, FileExistsError) as err:
        parser.error(str(err))
    finally:
        leave(wait=done)  # after a failure, other ranks may never reach a barrier
    return 0


if __name__ == "__main__":
    sys.exit(main())
