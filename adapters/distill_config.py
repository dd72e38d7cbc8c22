"""The settings of a ``mfcore-distill`` run: :class:`DistillConfig`, checked once where it is
built, and what the entry point knows about them (which a resume may change, which matter
only with alignment, what a checkpoint that predates a setting ran with)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mfcore._checks import (
    check_choice,
    check_fraction,
    check_instance,
    check_int64,
    check_positive_int,
    check_real,
)
from mfcore.adapters._files import check_file
from mfcore.adapters.alignment import CRITICS
from mfcore.adapters.arcflow_objective import STUDENTS
from mfcore.adapters.family import FAMILIES
from mfcore.adapters.loading import DTYPES
from mfcore.adapters.monitor import check_reporter
from mfcore.adapters.parallel import (
    MODES,
)
from mfcore.adapters.student import GUIDANCE_RULES, R_EMBEDDINGS
from mfcore.jvp import JVP_METHODS

__all__ = [
    "SWITCHES",
    "DTYPES",
    "GRID_STEPS",
    "LEGACY",
    "RESUMABLE",
    "ALIGN_ONLY",
    "DistillConfig",
    "check_device",
]

SWITCHES = ("gated", "fixed", "never")
"""``--switch``: to the differential target once the targets agree (gate) and at
``--warmup-steps`` at the earliest; at ``--warmup-steps`` unconditionally (the paper); or
never (the discrete target throughout)."""


# --------------------------------------------------------------------------- config


@dataclass
class DistillConfig:
    """Everything a run depends on (recorded in each checkpoint; see ``train --help``).

    Built, it checks each setting (an error naming it) and the settings that rule each
    other out (one ``ValueError`` naming them all)."""

    data: str
    output: str
    model: str | None = None
    tiny: bool = False
    family: str = "auto"
    tiny_guidance: bool = False
    student: str = "meanflow"
    r_embedding: str = "interval"
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
    teacher_guidance: str = "cfg"
    apg_norm_threshold: float = 10.0
    switch: str = "never"
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
    resume_from: str | None = None
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
    validation_prompts: str | None = None
    report_to: str = "tensorboard"
    progress: bool = True

    def __post_init__(self) -> None:
        tiny, prompts = bool(self.tiny), self.validation_prompts is not None
        one_source = tiny != (self.model is not None)
        arcflow_r = self.student == "arcflow" and self.r_embedding != "interval"
        ruled_out = [  # settings that rule each other out, named together
            (not one_source, "give exactly one of model (a checkpoint folder) and tiny"),
            (tiny and prompts, "validation_prompts needs a model with text encoders, not tiny"),
            (arcflow_r, "student 'arcflow' takes r_embedding 'interval' only"),
        ]
        problems = [why for wrong, why in ruled_out if wrong]
        if problems:
            raise ValueError("; ".join(problems))
        if prompts:
            check_file(self.validation_prompts, "validation prompt file")
        check_choice("family", self.family, ("auto", *FAMILIES))
        if self.resume_from is not None:
            check_instance("resume_from", self.resume_from, str, "a checkpoint folder (a str)")
            self.resume = True  # a checkpoint to resume from is a resume
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
            check_positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "align_start", "critic_lead", "preview_every"):
            check_positive_int(name, getattr(self, name), minimum=0)
        check_positive_int("keep_checkpoints", self.keep_checkpoints)
        check_int64("seed", self.seed)
        if not (isinstance(self.grad_clip, int | float) and self.grad_clip > 0):
            raise ValueError(
                f"grad_clip must be > 0 (inf turns clipping off), got {self.grad_clip!r}"
            )
        check_device(self.device)
        check_choice("align", self.align, ("none", *CRITICS))
        check_choice("switch", self.switch, SWITCHES)
        check_choice("student", self.student, STUDENTS)
        check_choice("r_embedding", self.r_embedding, R_EMBEDDINGS)
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
        check_choice("teacher_guidance", self.teacher_guidance, GUIDANCE_RULES)
        check_reporter(self.report_to)
        check_real("apg_norm_threshold", self.apg_norm_threshold, minimum=0.0)
        check_real("critic_lr", self.critic_lr, minimum=0.0, strict=True)
        check_choice("jvp", self.jvp, JVP_METHODS)
        check_choice("weights_dtype", self.weights_dtype, DTYPES)
        check_real("lr", self.lr, minimum=0.0, strict=True)
        check_fraction("grid_fraction", self.grid_fraction)
        check_fraction("ema_decay", self.ema_decay, below_one=True)


# the sampling grids whose intervals grid_fraction trains (the step counts users sample with)
GRID_STEPS = (1, 2, 4)

# What a checkpoint that predates a setting ran with (before the gate and guard existed the
# switch was fixed and unguarded; before the families every run was FLUX's).
LEGACY = {"switch": "fixed", "guard": False, "family": "flux", "grid_fraction": 0.0}
LEGACY |= {"r_embedding": "interval"}
# Settings that may differ between a run and its resumption (the EMA shadows the weights
# without steering them; a checkpoint without one starts it from the resumed weights).
RESUMABLE = {"steps", "resume", "resume_from", "progress", "checkpoint_every", "keep_checkpoints"}
RESUMABLE |= {"output"}
RESUMABLE |= {"allow_data_change"}
RESUMABLE |= {"ema", "ema_decay", "preview_every", "validation_prompts", "report_to"}
# (a rollback needs the copy taken at the switch: resumed without one, it waits for the next)
RESUMABLE |= {"rollback"}
# (how the global batch is computed: the engine and the micro-batches change only float order)
RESUMABLE |= {"parallel", "micro_batch_size"}
# Settings that only matter with an alignment term.
ALIGN_ONLY = {f.name for f in dataclasses.fields(DistillConfig)} & {
    "align_weight",
    "align_steps",
    "align_start",
    "critic_lead",
    "critic_updates",
    "critic_lr",
    "critic_rank",
    "critic_ode_steps",
}


def check_device(device: object) -> None:
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
