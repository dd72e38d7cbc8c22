"""Distil a FLUX, HunyuanImage or SD3 checkpoint into a few-step student: ``mfcore-distill``.

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

import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mfcore.adapters.alignment import Alignment, FakeVelocity
from mfcore.adapters.arcflow_objective import build_arcflow
from mfcore.adapters.data import LatentDataset
from mfcore.adapters.distill_config import DTYPES, GRID_STEPS, SWITCHES, DistillConfig
from mfcore.adapters.ema import EMA
from mfcore.adapters.family import FAMILIES, TrainingFamily, detect_family, get_family
from mfcore.adapters.generation import decode_latents, generate_latents, seeded_noise
from mfcore.adapters.lora import LoraSpec
from mfcore.adapters.monitor import RunLog, latents_to_images
from mfcore.adapters.parallel import (
    INTERVAL_MODULE,
    Split,
    World,
    choose_mode,
    full_trained_weights,
    holds_module,
    join,
    mixed_precision,
    release_gathered,
    shard,
    wrap,
)
from mfcore.adapters.prepare import read_prompts
from mfcore.adapters.routing import attention_mode_for, enable_gradient_checkpointing
from mfcore.adapters.run_checkpoints import (
    check_resume,
    export_student,
    latest_checkpoint,
    load_checkpoint,
    resume_point,
    save_checkpoint,
)
from mfcore.adapters.step import (
    AlignmentHook,
    Run,
    micro_batch_critic_loss,
    micro_batch_loss,
    train_step,
)
from mfcore.adapters.student import MeanFlowStudent
from mfcore.losses import AdaptiveWeight, MeanFlowLoss
from mfcore.solvers import sample_teacher
from mfcore.targets import DifferentialTarget, TeacherODETarget
from mfcore.time import GridPairSampler, LogitNormalTime, TimePairSampler
from mfcore.warmup import SwitchGate, SwitchGuard, SwitchRollback, WarmupTarget

__all__ = [
    "SWITCHES",
    "DistillConfig",
    "AlignmentHook",
    "resolve_family",
    "build_run",
    "distill",
    "latest_checkpoint",
    "main",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- alignment hook


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

    Example:
        One step of a tiny random FLUX on synthetic data:

        >>> import tempfile
        >>> from mfcore.adapters.data import make_synthetic_data
        >>> from mfcore.adapters.distill import build_run
        >>> from mfcore.adapters.distill_config import DistillConfig
        >>> from mfcore.adapters.step import train_step
        >>> folder = tempfile.mkdtemp()
        >>> _ = make_synthetic_data(folder + "/data", family="flux", num_files=1, per_file=2,
        ...                         height=4, width=4, seq_len=4)
        >>> cfg = DistillConfig(data=folder + "/data", output=folder + "/run", tiny=True,
        ...                     family="flux", steps=1, lora_rank=2, device="cpu",
        ...                     weights_dtype="fp32", progress=False, preview_every=0,
        ...                     report_to="none", batch_size=2)
        >>> run = build_run(cfg)
        >>> metrics = train_step(run)
        >>> run.step, metrics["phase"], sorted(metrics)[:3]
        (1, 'discrete', ['frac_r_neq_t', 'grad_norm', 'loss'])
    """
    if cfg.student == "arcflow" and cfg.family != "flux":
        raise ValueError(f"--student arcflow runs on FLUX only, not {cfg.family}")
    family: TrainingFamily = get_family(cfg.family)  # type: ignore[assignment]
    data = LatentDataset(cfg.data, family)
    dtype = DTYPES[cfg.weights_dtype]
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
    _check_combination(cfg, world, split, alignment)
    if world.mode != "fsdp":  # FSDP2 moves each unit's shards to the device itself
        transformer.to(device)
    loss: Any = None
    if cfg.student == "arcflow":
        _, h, w = data.shapes["latents"]
        grid = family.sampling_grid(cfg.arc_steps, h, w, scheduler=scheduler, device=device)
        student, loss = build_arcflow(cfg, transformer, grid)
    else:
        kwargs = dict(
            lora=LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha),
            guidance_scale=cfg.guidance_scale,
            attention=attention_mode_for(cfg.jvp),
        )
        if cfg.r_embedding == "native":
            student = family.native_student(transformer, **kwargs)
        else:
            student = MeanFlowStudent(transformer, family, **kwargs)
        # train_step checks each batch once (Teacher.check_inputs), the loss the times:
        # the model calls of a step (the teacher's solve makes several) trust them
        student.validate = False
    if world.mode != "fsdp":
        student.to(device)
    fake = _build_fake(cfg, student) if cfg.align != "none" else None
    if cfg.gradient_checkpointing:
        if hasattr(transformer, "enable_gradient_checkpointing"):
            enable_gradient_checkpointing(transformer)
        else:
            logger.info("%s has no gradient checkpointing of its own", type(transformer).__name__)
    teacher = student.teacher(
        true_cfg_scale=cfg.true_cfg_scale,
        rule=cfg.teacher_guidance,
        apg_norm_threshold=cfg.apg_norm_threshold,
    )
    if world.distributed and not holds_module(transformer, student.interval):
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
        critic = wrap(micro_batch_critic_loss, list(alignment.fake.parameters()), world)
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
        objective=wrap(micro_batch_loss, student.trainable_parameters(), world),
        critic_objective=critic,
        ema=ema,
        rollback=rollback,
    )


def _check_combination(cfg: DistillConfig, world: World, split: Split, alignment: Any) -> None:
    """Raise one ``ValueError`` naming every setting that the others rule out: ``cfg.align``
    beside an ``alignment`` term of one's own; such a term, or ``--student arcflow`` (its
    rollout draws per call), in several processes or micro-batches; an alignment term with
    ``--student arcflow`` (besides a family other than FLUX, refused before anything loads)."""
    whole = not world.distributed and len(split.parts()) == 1
    arcflow = cfg.student == "arcflow"
    own, align = alignment is not None, cfg.align != "none"
    wrong = {
        "give either cfg.align or an alignment term, not both": own and align,
        "an alignment hook of your own runs in one process without micro-batches: use "
        "cfg.align for multi-process runs and micro_batch_size": own and not whole,
        "--student arcflow takes no alignment term (--align none)": arcflow and (own or align),
        "--student arcflow runs in one process without micro-batches (its rollout draws per "
        "call): run it without torchrun and --micro-batch-size": arcflow and not whole,
    }
    problems = [why for why, refused in wrong.items() if refused]
    if problems:
        raise ValueError("; ".join(problems))


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


# --------------------------------------------------------------------------- driver


#: Euler steps of the teacher's preview samples (FLUX's pipeline default).
PREVIEW_TEACHER_STEPS = 28


def _preview(run: Run, log: RunLog | None) -> None:
    """``previews/step-XXXXXXX.png``: one row per preview sample (the validation prompts, else
    the data's first two conditions), its teacher sample (:data:`PREVIEW_TEACHER_STEPS`
    Euler steps, computed at the first preview and kept) and the (EMA) student's 1-, 2- and
    4-step samples, all from the same noise. Every rank samples, as the sharded model needs;
    rank 0 writes them."""
    x, cond = run.data.take(list(range(min(2, len(run.data)))), run.device)
    _, c, h, w = x.shape
    if run.cfg.validation_prompts is not None:
        if run.preview_cond is None:  # encoded once, the text encoders then let go
            prompts = read_prompts(run.cfg.validation_prompts)
            encoder = run.family.prompt_encoder(run.cfg.model, DTYPES[run.cfg.weights_dtype])
            encoded = encoder(prompts, (h, w), None)
            run.preview_cond = {k: v.to(run.device) for k, v in encoded.items()}
        cond = run.preview_cond
    n = next(v for v in cond.values() if isinstance(v, Tensor)).shape[0]
    if run.preview_reference is None:
        noise = seeded_noise((n, c, h, w), run.cfg.seed, run.device, torch.float32)
        grid = run.family.sampling_grid(
            PREVIEW_TEACHER_STEPS, h, w, scheduler=run.scheduler, device=run.device
        )
        run.preview_reference = sample_teacher(run.teacher, noise, grid=grid, cond=cond)
    columns = [run.preview_reference]
    ema = run.ema.applied() if run.ema is not None else contextlib.nullcontext()
    with ema:
        for steps in GRID_STEPS:
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
        path, found = resume_point(run)
        check_resume(cfg, path, found, run.data)
        load_checkpoint(run, path, found)
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
        log = RunLog(
            cfg.output, run.step, report_to=cfg.report_to, settings=dataclasses.asdict(cfg)
        )
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
                save_checkpoint(run)
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
            export_student(run.student, os.path.join(cfg.output, "student"))
    run.world.barrier()
    run.student.validate = True  # the caller's student checks its calls again
    return run.student


if __name__ == "__main__":  # torchrun ... -m mfcore.adapters.distill (a program, not an import)
    from mfcore.adapters.distill_cli import main

    sys.exit(main())
