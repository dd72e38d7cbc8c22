"""Distil FLUX into a few-step MeanFlow student: ``python -m mfcore.adapters.flux_distill``.

The seed method: the student (:class:`~mfcore.adapters.flux.FluxStudent`, LoRA plus an
interval embedding) first regresses the teacher's ODE secant over ``[r, t]`` (the discrete
warm-up target), then the differential MeanFlow target ``v - (t - r) du/dt`` (MeanFlow,
arXiv 2505.13447, eq. 10), switched by :class:`mfcore.targets.WarmupTarget` inside
:class:`mfcore.losses.MeanFlowLoss`; with ``--align fake`` (or ``meanflow``) plus
``align_weight *`` trajectory distribution alignment of the student's ``align_steps``-step
samples through a fake-velocity critic, a second LoRA adapter on the same base weights
(:mod:`mfcore.adapters.flux_align`).

Data: a folder of ``*.safetensors`` files, each holding ``N >= 1`` samples:

- ``latents`` ``(N, C, H, W)``: VAE latents, normalised as the pipeline does,
  ``(vae.encode(x).latent_dist.sample() - shift_factor) * scaling_factor``;
- ``prompt_embeds`` ``(N, L, joint_attention_dim)``: T5 embeddings;
- ``pooled_prompt_embeds`` ``(N, pooled_projection_dim)``: CLIP pooled embeddings;
- optionally ``negative_prompt_embeds`` / ``negative_pooled_prompt_embeds`` (for true CFG
  teachers).

Every sample shares one ``(C, H, W)`` and one ``L``. ``make-data`` writes a synthetic folder.

Commands::

    python -m mfcore.adapters.flux_distill train --model PATH --data DIR --output DIR
    python -m mfcore.adapters.flux_distill train --tiny --data DIR --output DIR --device cpu
    python -m mfcore.adapters.flux_distill make-data DIR --tiny

A run writes ``checkpoints/step-XXXXXXX/`` every ``--checkpoint-every`` steps (student
trainable state, optimiser, warm-up state, RNG states, step; ``--resume`` continues from
the newest exactly), ``metrics.jsonl``, and the final student in ``student/``
(:meth:`FluxStudent.save_pretrained`: its LoRA loads in a stock ``FluxPipeline``).

Other alignment terms plug in through :class:`AlignmentHook` (``distill(...,
alignment=...)``).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from diffusers import FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from mfcore._checks import check_choice, check_positive_int, check_real
from mfcore.adapters._state import load_state, read_tensors, save_state
from mfcore.adapters.flux import (
    TINY_FLUX_CONFIG,
    FluxStudent,
    attention_mode_for,
    check_flux_transformer,
    flux_mu,
)
from mfcore.adapters.flux_align import CRITICS, FluxAlignment, FluxFakeVelocity
from mfcore.adapters.lora import LoraSpec
from mfcore.jvp import JVP_METHODS
from mfcore.losses import AdaptiveWeight, MeanFlowLoss
from mfcore.targets import DifferentialTarget, TeacherODETarget
from mfcore.time import LogitNormalTime, ResolutionShiftedTime, TimePairSampler
from mfcore.warmup import SwitchGate, SwitchGuard, WarmupTarget

__all__ = [
    "REQUIRED_KEYS",
    "OPTIONAL_KEYS",
    "DistillConfig",
    "LatentDataset",
    "AlignmentHook",
    "make_synthetic_data",
    "load_flux_transformer",
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

REQUIRED_KEYS = ("latents", "prompt_embeds", "pooled_prompt_embeds")
OPTIONAL_KEYS = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")
_CKPT_PREFIX = "step-"


# --------------------------------------------------------------------------- config


@dataclass
class DistillConfig:
    """Everything a run depends on (recorded in each checkpoint; see ``train --help``)."""

    data: str
    output: str
    model: str | None = None
    tiny: bool = False
    tiny_guidance: bool = False
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
    jvp: str = "func"
    single_forward: bool = False
    equal_fraction: float = 0.75
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
    seed: int = 0
    device: str = "auto"
    weights_dtype: str = "bf16"
    autocast: bool = True
    gradient_checkpointing: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.model is None) == (not self.tiny):
            raise ValueError("give exactly one of model (a FLUX checkpoint folder) and tiny")
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
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("warmup_steps", "align_start", "critic_lead"):
            check_positive_int(name, getattr(self, name), minimum=0)
        check_positive_int("keep_checkpoints", self.keep_checkpoints)
        if not (isinstance(self.grad_clip, int | float) and self.grad_clip > 0):
            raise ValueError(
                f"grad_clip must be > 0 (inf turns clipping off), got {self.grad_clip!r}"
            )
        _check_device(self.device)
        if self.align not in ("none", *CRITICS):
            raise ValueError(f"align must be one of {('none', *CRITICS)}, got {self.align!r}")
        check_choice("switch", self.switch, SWITCHES)
        check_real("gate_delta", self.gate_delta, minimum=0.0, strict=True)
        check_real("gate_rho", self.gate_rho, minimum=0.0, strict=True)
        check_real("guard_margin", self.guard_margin, minimum=0.0)
        if self.warmup_threshold is not None:
            check_real("warmup_threshold", self.warmup_threshold, minimum=0.0, strict=True)
        check_real("align_weight", self.align_weight, minimum=0.0)
        check_real("critic_lr", self.critic_lr, minimum=0.0, strict=True)
        if self.jvp not in JVP_METHODS:
            raise ValueError(f"jvp must be one of {JVP_METHODS}, got {self.jvp!r}")
        if self.weights_dtype not in _DTYPES:
            raise ValueError(f"weights_dtype must be one of {tuple(_DTYPES)}")
        check_real("lr", self.lr, minimum=0.0, strict=True)


_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}

# What a checkpoint that predates a setting ran with (before the gate and guard existed the
# switch was fixed and unguarded).
_LEGACY = {"switch": "fixed", "guard": False}
# Settings that may differ between a run and its resumption.
_RESUMABLE = {"steps", "resume", "progress", "checkpoint_every", "keep_checkpoints", "output"}
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


# --------------------------------------------------------------------------- data


class LatentDataset:
    """Precomputed latents and prompt embeddings in a folder of safetensors files.

    Args:
        folder: the folder (see the module docstring for the format).

    Raises:
        FileNotFoundError: if the folder does not exist or holds no ``.safetensors`` file.
        ValueError: if a file misses a key or its shapes disagree.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"data folder {folder} does not exist")
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"data folder {folder} holds no .safetensors files")
        self.folder = str(folder)
        self.files = files
        self.index: list[tuple[int, int]] = []
        self.shapes: dict[str, tuple[int, ...]] | None = None
        for i, path in enumerate(files):
            n = self._scan(path)
            self.index.extend((i, j) for j in range(n))
        if not self.index:
            raise ValueError(f"data folder {folder} holds no samples (every file has N = 0)")
        self._cache: dict[int, dict[str, Tensor]] = {}

    def _scan(self, path: str) -> int:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            missing = [k for k in REQUIRED_KEYS if k not in keys]
            if missing:
                raise ValueError(f"{path} lacks {missing}; a sample file needs {REQUIRED_KEYS}")
            shapes = {
                k: tuple(f.get_slice(k).get_shape())
                for k in keys & set(REQUIRED_KEYS + OPTIONAL_KEYS)
            }
        n = shapes["latents"][0]
        if any(s[0] != n for s in shapes.values()):
            raise ValueError(f"{path}: the tensors disagree on the number of samples {shapes}")
        if len(shapes["latents"]) != 4:
            raise ValueError(f"{path}: latents must be (N, C, H, W), got {shapes['latents']}")
        per_sample = {k: s[1:] for k, s in shapes.items()}
        if self.shapes is None:
            self.shapes = per_sample
        elif per_sample != self.shapes:
            raise ValueError(
                f"{path} has per-sample shapes {per_sample}, but {self.files[0]} has "
                f"{self.shapes}: every sample in a folder must share them"
            )
        return n

    def __len__(self) -> int:
        return len(self.index)

    def check_transformer(self, transformer: FluxTransformer2DModel) -> None:
        """Raise ``ValueError`` unless the data fits ``transformer``'s config."""
        cfg, s = transformer.config, self.shapes
        assert s is not None
        c, h, w = s["latents"]
        if 4 * c != cfg.in_channels:
            raise ValueError(
                f"latents have {c} channels; this FLUX takes {cfg.in_channels // 4} "
                f"({cfg.in_channels} packed)"
            )
        if h % 2 or w % 2:
            raise ValueError(f"latents need an even height and width, got {h}x{w}")
        if len(s["prompt_embeds"]) != 2 or s["prompt_embeds"][1] != cfg.joint_attention_dim:
            raise ValueError(
                f"prompt_embeds must be (N, L, {cfg.joint_attention_dim}), "
                f"got (N, *{s['prompt_embeds']})"
            )
        if s["pooled_prompt_embeds"] != (cfg.pooled_projection_dim,):
            raise ValueError(
                f"pooled_prompt_embeds must be (N, {cfg.pooled_projection_dim}), "
                f"got (N, *{s['pooled_prompt_embeds']})"
            )

    def _file(self, i: int) -> dict[str, Tensor]:
        if i not in self._cache:
            with safe_open(self.files[i], framework="pt") as f:
                self._cache[i] = {k: f.get_tensor(k) for k in f.keys() if k in self.shapes}
        return self._cache[i]

    def indices(self, step: int, batch_size: int, seed: int) -> list[int]:
        """Sample indices of ``step``: consecutive slices of per-epoch permutations.

        A function of ``(step, batch_size, seed)`` only, so a resumed run sees the same batches.
        """
        n = len(self)
        out = []
        for pos in range(step * batch_size, (step + 1) * batch_size):
            epoch, k = divmod(pos, n)
            perm = torch.randperm(
                n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            )
            out.append(int(perm[k]))
        return out

    def batch(
        self, step: int, batch_size: int, seed: int, device: torch.device | str
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(latents (B, C, H, W) float32, cond)`` for ``step`` on ``device``."""
        samples = [
            self._file(i) | {"_row": j}
            for i, j in (self.index[k] for k in self.indices(step, batch_size, seed))
        ]
        keys = [k for k in samples[0] if k != "_row"]
        stacked = {k: torch.stack([s[k][s["_row"]] for s in samples]) for k in keys}
        out = {k: v.to(device=device, dtype=torch.float32) for k, v in stacked.items()}
        return out.pop("latents"), out


def make_synthetic_data(
    folder: str | os.PathLike,
    *,
    num_files: int = 2,
    per_file: int = 2,
    channels: int = 1,
    height: int = 8,
    width: int = 8,
    seq_len: int = 8,
    joint_attention_dim: int = 32,
    pooled_projection_dim: int = 32,
    negatives: bool = False,
    seed: int = 0,
) -> list[str]:
    """Write a random dataset in the training format (for tests and smoke runs).

    Returns:
        the paths written.
    """
    sizes = dict(num_files=num_files, per_file=per_file, channels=channels, height=height)
    sizes |= dict(width=width, seq_len=seq_len, joint_attention_dim=joint_attention_dim)
    sizes |= dict(pooled_projection_dim=pooled_projection_dim)
    for name, value in sizes.items():
        check_positive_int(name, value)
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(num_files):
        data = {
            "latents": torch.randn(per_file, channels, height, width, generator=g),
            "prompt_embeds": torch.randn(per_file, seq_len, joint_attention_dim, generator=g),
            "pooled_prompt_embeds": torch.randn(per_file, pooled_projection_dim, generator=g),
        }
        if negatives:
            data["negative_prompt_embeds"] = torch.randn(
                per_file, seq_len, joint_attention_dim, generator=g
            )
            data["negative_pooled_prompt_embeds"] = torch.randn(
                per_file, pooled_projection_dim, generator=g
            )
        path = os.path.join(folder, f"samples-{i:05d}.safetensors")
        save_file(data, path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- model


def load_flux_transformer(
    path: str | os.PathLike, *, dtype: torch.dtype
) -> tuple[FluxTransformer2DModel, dict]:
    """Load the transformer (and the scheduler config, if any) of a local FLUX checkpoint.

    ``path`` is a diffusers pipeline folder (with ``transformer/``) or a transformer folder.

    Raises:
        FileNotFoundError: if there is no transformer config.
        ValueError: if the checkpoint is not a FLUX transformer.
    """
    sub = os.path.join(path, "transformer")
    folder = sub if os.path.isdir(sub) else str(path)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} is not a diffusers checkpoint: no {config_path}")
    with open(config_path) as f:
        cls = json.load(f).get("_class_name")
    if cls != "FluxTransformer2DModel":
        raise ValueError(
            f"{path} holds a {cls} checkpoint, not FLUX (FluxTransformer2DModel); "
            "this entry point distils FLUX.1 models only"
        )
    transformer = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=dtype)
    scheduler: dict = {}
    sched_path = os.path.join(path, "scheduler", "scheduler_config.json")
    if os.path.isfile(sched_path):
        with open(sched_path) as f:
            scheduler = json.load(f)
    return transformer, scheduler


def _build_transformer(cfg: DistillConfig) -> tuple[FluxTransformer2DModel, dict]:
    dtype = _DTYPES[cfg.weights_dtype]
    if cfg.tiny:
        torch.manual_seed(cfg.seed)
        config = dict(TINY_FLUX_CONFIG, guidance_embeds=cfg.tiny_guidance)
        return FluxTransformer2DModel(**config).to(dtype), {}
    assert cfg.model is not None
    return load_flux_transformer(cfg.model, dtype=dtype)


# --------------------------------------------------------------------------- alignment hook


@runtime_checkable
class AlignmentHook(Protocol):
    """A trajectory-alignment term added to the MeanFlow loss (e.g. :class:`FluxAlignment`).

    ``critic_step`` trains the critic (its own optimiser) on the batch before the student's
    step; ``student_loss`` returns the student's alignment loss (with graph) and metrics;
    the total is ``mean_flow + weight * student_loss``. ``state_dict`` /
    ``load_state_dict`` make it resumable (tensors and plain values only).
    """

    weight: float

    def critic_step(
        self, student: FluxStudent, teacher: Any, x: Tensor, cond: dict, step: int
    ) -> dict: ...

    def student_loss(
        self, student: FluxStudent, teacher: Any, x: Tensor, cond: dict, step: int
    ) -> tuple[Tensor, dict]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# --------------------------------------------------------------------------- training


@dataclass
class _Run:
    cfg: DistillConfig
    student: FluxStudent
    teacher: Any
    loss: MeanFlowLoss
    optimizer: torch.optim.Optimizer
    data: LatentDataset
    generator: torch.Generator
    device: torch.device
    alignment: AlignmentHook | None
    step: int = 0


def _build_loss(cfg: DistillConfig, data: LatentDataset, scheduler: dict) -> MeanFlowLoss:
    base = LogitNormalTime(cfg.time_mean, cfg.time_std)
    if cfg.shift_times:
        assert data.shapes is not None
        _, h, w = data.shapes["latents"]
        base = ResolutionShiftedTime(base, flux_mu(h * w // 4, scheduler))
    return MeanFlowLoss(
        time_sampler=TimePairSampler(base, equal_fraction=cfg.equal_fraction),
        target=_build_target(cfg),
        weighting=AdaptiveWeight(p=cfg.adaptive_p),
    )


def _build_target(cfg: DistillConfig) -> TeacherODETarget | WarmupTarget:
    """The discrete warm-up target, behind the switch ``cfg.switch`` asks for."""
    discrete = TeacherODETarget(steps=cfg.warmup_ode_steps, method=cfg.warmup_ode_method)
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
    )


def _setup(
    cfg: DistillConfig,
    alignment: AlignmentHook | None,
    transformer: FluxTransformer2DModel | None,
) -> _Run:
    data = LatentDataset(cfg.data)
    if transformer is None:
        transformer, scheduler = _build_transformer(cfg)
    else:
        check_flux_transformer(transformer)
        scheduler = {}
    data.check_transformer(transformer)
    if (
        not transformer.config.guidance_embeds
        and cfg.true_cfg_scale > 1
        and "negative_prompt_embeds" not in data.shapes
    ):
        raise ValueError("true_cfg_scale > 1 needs negative_prompt_embeds in the data")
    device = torch.device(_resolve_device(cfg.device))
    transformer.to(device)
    student = FluxStudent(
        transformer,
        lora=LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha),
        guidance_scale=cfg.guidance_scale,
        attention=attention_mode_for(cfg.jvp),
    )
    student.to(device)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    teacher = student.teacher(true_cfg_scale=cfg.true_cfg_scale)
    if cfg.align != "none":
        if alignment is not None:
            raise ValueError("give either cfg.align or an alignment term, not both")
        alignment = _build_alignment(cfg, student)
    optimizer = torch.optim.AdamW(
        student.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    return _Run(
        cfg,
        student,
        teacher,
        _build_loss(cfg, data, scheduler),
        optimizer,
        data,
        generator,
        device,
        alignment,
    )


def _build_alignment(cfg: DistillConfig, student: FluxStudent) -> FluxAlignment:
    spec = LoraSpec(rank=cfg.critic_rank, target_modules=student.lora_spec.target_modules)
    fake = FluxFakeVelocity(student, lora=spec)
    return FluxAlignment(
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


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


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


def _train_step(run: _Run) -> dict[str, float]:
    cfg = run.cfg
    x, cond = run.data.batch(run.step, cfg.batch_size, cfg.seed, run.device)
    metrics: dict[str, Any] = {}
    use_bf16 = cfg.autocast and run.device.type == "cuda"
    if run.alignment is not None:
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            critic = run.alignment.critic_step(run.student, run.teacher, x, cond, run.step)
        metrics.update(critic)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        loss, mf = run.loss(
            run.student, x, teacher=run.teacher, cond=cond, step=run.step, generator=run.generator
        )
        metrics.update(mf)
        if run.alignment is not None:
            align, am = run.alignment.student_loss(run.student, run.teacher, x, cond, run.step)
            loss = loss + run.alignment.weight * align
            metrics.update(am)
            metrics["loss_total"] = loss.detach()
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError(f"the loss is not finite at step {run.step}: {float(loss)}")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if math.isfinite(cfg.grad_clip):
        metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(
            run.student.trainable_parameters(), cfg.grad_clip
        )
    run.optimizer.step()
    run.step += 1
    metrics["phase"] = getattr(run.loss.target, "phase", "discrete")
    return {k: (v if isinstance(v, str) else float(v)) for k, v in metrics.items()}


# --------------------------------------------------------------------------- checkpoints


def _rng_state(run: _Run) -> dict:
    state = {"torch": torch.get_rng_state(), "generator": run.generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _save_checkpoint(run: _Run) -> str:
    root = os.path.join(run.cfg.output, "checkpoints")
    final = os.path.join(root, f"{_CKPT_PREFIX}{run.step:07d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(
        {k: v.contiguous() for k, v in run.student.trainable_state_dict().items()},
        os.path.join(tmp, "student.safetensors"),
    )
    state = {
        "step": run.step,
        "optimizer": run.optimizer.state_dict(),
        "loss": run.loss.state_dict(),
        "rng": _rng_state(run),
        "alignment": run.alignment.state_dict() if run.alignment is not None else None,
    }
    save_state(state, os.path.join(tmp, "state"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(run.cfg), f, indent=2)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _prune(root, run.cfg.keep_checkpoints)
    return final


def _prune(root: str, keep: int) -> None:
    ckpts = sorted(
        d for d in os.listdir(root) if d.startswith(_CKPT_PREFIX) and not d.endswith(".tmp")
    )
    for d in ckpts[: max(len(ckpts) - keep, 0)]:
        shutil.rmtree(os.path.join(root, d))


def latest_checkpoint(output: str | os.PathLike) -> str | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = os.path.join(output, "checkpoints")
    if not os.path.isdir(root):
        return None
    ckpts = sorted(
        d for d in os.listdir(root) if d.startswith(_CKPT_PREFIX) and not d.endswith(".tmp")
    )
    return os.path.join(root, ckpts[-1]) if ckpts else None


def _load_checkpoint(run: _Run, path: str) -> None:
    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    now = dataclasses.asdict(run.cfg)
    # a setting added after the checkpoint was written had its default then, or the value
    # that reproduces what the code did before it existed
    defaults = {f.name: f.default for f in dataclasses.fields(DistillConfig)} | _LEGACY
    saved = {k: saved.get(k, defaults.get(k)) for k in now}
    ignored = set(_RESUMABLE) | (_ALIGN_ONLY if now["align"] == "none" else set())
    changed = sorted(k for k in now if k not in ignored and saved[k] != now[k])
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"cannot resume {path} with different settings ({diffs})")
    run.student.load_trainable_state_dict(
        read_tensors(os.path.join(path, "student.safetensors"), device=str(run.device))
    )
    state = load_state(os.path.join(path, "state"))
    run.optimizer.load_state_dict(state["optimizer"])
    run.loss.load_state_dict(state["loss"])
    torch.set_rng_state(state["rng"]["torch"])
    run.generator.set_state(state["rng"]["generator"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    if run.alignment is not None:
        if state["alignment"] is None:
            raise ValueError(f"{path} was saved without an alignment term")
        run.alignment.load_state_dict(state["alignment"])
    run.step = int(state["step"])


# --------------------------------------------------------------------------- driver


def _truncate_log(path: str, step: int) -> None:
    """Drop the lines of ``metrics.jsonl`` past ``step`` (written after the checkpoint a run
    resumes from), so each step is logged once."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        with open(path, "w") as f:
            f.writelines(kept)


def distill(
    cfg: DistillConfig,
    *,
    alignment: AlignmentHook | None = None,
    transformer: FluxTransformer2DModel | None = None,
) -> FluxStudent:
    """Run (or resume) a distillation and return the student; see the module docstring.

    Args:
        cfg: the run's settings.
        alignment: optional trajectory-alignment term (:class:`AlignmentHook`).
        transformer: an already built FLUX transformer to use instead of ``cfg.model``.
    """
    run = _setup(cfg, alignment, transformer)
    if cfg.resume:
        path = latest_checkpoint(cfg.output)
        if path is None:
            raise FileNotFoundError(f"--resume given but {cfg.output} has no checkpoint")
        _load_checkpoint(run, path)
        logger.info("resumed from %s at step %d", path, run.step)
    elif latest_checkpoint(cfg.output) is not None:
        raise FileExistsError(
            f"{cfg.output} already holds checkpoints: pass --resume or another --output"
        )
    os.makedirs(cfg.output, exist_ok=True)
    log_path = os.path.join(cfg.output, "metrics.jsonl")
    _truncate_log(log_path, run.step)
    bar = tqdm(total=cfg.steps, initial=run.step, disable=not cfg.progress, desc="distil")
    with open(log_path, "a") as log:
        while run.step < cfg.steps:
            metrics = _train_step(run)
            log.write(json.dumps({"step": run.step, **metrics}) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4g}", phase=metrics["phase"])
            if run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps:
                _save_checkpoint(run)
    bar.close()
    run.student.save_pretrained(os.path.join(cfg.output, "student"))
    return run.student


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The ``train`` and ``make-data`` command line."""
    parser = argparse.ArgumentParser(
        prog="python -m mfcore.adapters.flux_distill", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="distil a FLUX checkpoint into a MeanFlow student")
    src = tr.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--model", help="local diffusers FLUX checkpoint folder (pipeline or transformer)"
    )
    src.add_argument("--tiny", action="store_true", help="a random tiny FLUX (tests, smoke runs)")
    tr.add_argument("--data", required=True, help="folder of *.safetensors samples")
    tr.add_argument("--output", required=True, help="run folder (checkpoints, metrics, student)")
    defaults = DistillConfig(data="", output="", tiny=True)
    for field in dataclasses.fields(DistillConfig):
        if field.name in ("data", "output", "model", "tiny"):
            continue
        flag = "--" + field.name.replace("_", "-")
        value = getattr(defaults, field.name)
        if isinstance(value, bool):
            tr.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif field.name in ("lora_alpha", "warmup_threshold"):
            tr.add_argument(flag, type=float, default=value)
        else:
            tr.add_argument(flag, type=type(value), default=value)
    md = sub.add_parser("make-data", help="write a synthetic data folder")
    md.add_argument("folder")
    md.add_argument("--tiny", action="store_true", help="shapes for the tiny FLUX (the default)")
    md.add_argument("--num-files", type=int, default=2)
    md.add_argument("--per-file", type=int, default=2)
    md.add_argument("--channels", type=int, default=1)
    md.add_argument("--height", type=int, default=8)
    md.add_argument("--width", type=int, default=8)
    md.add_argument("--seq-len", type=int, default=8)
    md.add_argument("--joint-attention-dim", type=int, default=32)
    md.add_argument("--pooled-projection-dim", type=int, default=32)
    md.add_argument("--negatives", action="store_true")
    md.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; bad input ends with an argparse error naming what is wrong."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    if command == "make-data":
        args.pop("tiny")
        folder = args.pop("folder")
        try:
            paths = make_synthetic_data(folder, **args)
        except (TypeError, ValueError) as err:
            parser.error(str(err))
        sys.stdout.write(f"wrote {len(paths)} files to {folder}\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = DistillConfig(**args)
        distill(cfg)
    except (TypeError, ValueError, FileNotFoundError, FileExistsError) as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
