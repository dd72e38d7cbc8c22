"""ArcFlow as ``mfcore-distill``'s student (``--student arcflow``, FLUX only).

ArcFlow (Yang et al., arXiv 2602.09014) trains a momentum-mixture head plus LoRA on the
backbone (:class:`~mfcore.adapters.flux_arcflow.FluxArcFlowStudent`) by rolling the student
down an ``--arc-steps``-step grid from noise and matching its mixture's velocity to the
teacher's at sampled times inside each step (:class:`mfcore.arcflow.ArcFlowDistillationLoss`,
with teacher-mixed trajectories early in training). The data's latents are not used: the
target comes from the teacher alone, on the data's conditions.

:class:`ArcFlowObjective` gives that loss the call the training step makes of a MeanFlow loss,
so the rest of the entry point (EMA, checkpoints, resume, previews, export) is shared. The
rollout draws its own times and mixing from the run's generator per call, so an ArcFlow run is
one process without micro-batches (the MeanFlow step's equal-at-any-world-size contract does
not hold for it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mfcore.adapters.flux_arcflow import FluxArcFlowStudent
from mfcore.adapters.lora import LoraSpec
from mfcore.arcflow import ArcFlowDistillationLoss, TeacherMixSchedule
from mfcore.losses import AdaptiveWeight

__all__ = ["STUDENTS", "ArcFlowObjective", "build_arcflow"]

STUDENTS = ("meanflow", "arcflow")
"""``--student``: the MeanFlow student (average velocity; the seed method), or ArcFlow's
momentum mixture (FLUX only)."""

# the condition keys the ArcFlow student takes (FLUX's; negatives are accepted and ignored)
_COND = ("prompt_embeds", "pooled_prompt_embeds", "guidance")


class ArcFlowObjective:
    """:class:`~mfcore.arcflow.ArcFlowDistillationLoss` called as the training step calls a
    :class:`~mfcore.losses.MeanFlowLoss`: ``(student, x, teacher=, noise=, cond=, r=, t=,
    step=, generator=, validate=)``; ``x``, ``r``, ``t`` and ``validate`` are unused (the
    rollout starts at the noise, draws its own times from ``generator`` and checks what it
    is given)."""

    time_sampler = None  # the step draws no time pairs for it
    target = None  # no warm-up target, switch or guard
    phase = "arcflow"

    def __init__(self, loss: ArcFlowDistillationLoss) -> None:
        self.loss = loss

    def __call__(
        self,
        student: FluxArcFlowStudent,
        x: Tensor,
        *,
        teacher: Any,
        noise: Tensor,
        cond: dict,
        r: Tensor,
        t: Tensor,
        step: int,
        generator: torch.Generator,
        validate: bool = True,
    ) -> tuple[Tensor, dict[str, Any]]:
        student_cond = {k: v for k, v in cond.items() if k in _COND or k.startswith("negative_")}
        return self.loss(student, teacher, noise, cond=student_cond, step=step, generator=generator)

    def state_dict(self) -> dict[str, Any]:
        return self.loss.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loss.load_state_dict(state)


def build_arcflow(
    cfg: Any, transformer: torch.nn.Module, grid: Tensor
) -> tuple[FluxArcFlowStudent, ArcFlowObjective]:
    """The ArcFlow student on ``transformer`` and its objective on the sampling ``grid``
    ``(arc_steps + 1,)``: ``cfg.arc_components`` components, LoRA of ``cfg.lora_rank``,
    teacher mixing from 0.5 decaying linearly to 0 over ``cfg.warmup_steps`` (ArcFlow's
    warm-up: trajectories partly the teacher's), the adaptive weight of ``cfg.adaptive_p``."""
    student = FluxArcFlowStudent(
        transformer,
        num_components=cfg.arc_components,
        lora=LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha),
        guidance_scale=cfg.guidance_scale,
    )
    loss = ArcFlowDistillationLoss(
        grid=grid,
        mix_schedule=TeacherMixSchedule(
            0.5 if cfg.warmup_steps else 0.0, decay_steps=max(cfg.warmup_steps, 1)
        ),
        weighting=AdaptiveWeight(p=cfg.adaptive_p),
    )
    return student, ArcFlowObjective(loss)
