"""Samples of the teacher and of a student from fixed noise, and their scores.

Every sample set of one benchmark shares its noise: ``seeded_noise((N, 1, H, W), seed)``
(:func:`mfcore.adapters.generation.seeded_noise`) with the labels
``[0] * n + [1] * n + ... + [9] * n``, so a student's k-step sample and the teacher's
50-step sample of the same row start from the same noise and can be compared one by one.
Both sample along the family's own grid (FLUX's shifted one, from the teacher's scheduler
config); the teacher with Euler steps (``FlowMatchEulerDiscreteScheduler``'s), the student
with MeanFlow steps ``z_r = z_t - (t - r) u`` (arXiv 2505.13447, eq. 12).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mfcore.adapters.flux import FAMILY
from mfcore.adapters.generation import generate_latents, seeded_noise
from mfcore.adapters.student import Teacher
from mfcore.solvers import sample_teacher

from .data import NUM_CLASSES, SIZE, conditions

__all__ = ["class_labels", "teacher_samples", "student_samples", "pixel_distance"]


def class_labels(per_class: int) -> Tensor:
    """``(10 * per_class,)`` labels, class by class."""
    return torch.arange(NUM_CLASSES).repeat_interleave(per_class)


def teacher_samples(
    transformer: nn.Module,
    table: tuple[Tensor, Tensor],
    labels: Tensor,
    *,
    steps: int,
    seed: int,
    cfg_scale: float = 1.0,
    scheduler: Mapping[str, Any] | None = None,
) -> Tensor:
    """The teacher's Euler samples ``(N, 1, SIZE, SIZE)`` of ``labels`` in ``steps`` steps."""
    teacher = Teacher(transformer, FAMILY, true_cfg_scale=cfg_scale)
    noise = seeded_noise((len(labels), 1, SIZE, SIZE), seed, "cpu", torch.float32)
    grid = FAMILY.sampling_grid(steps, SIZE, SIZE, scheduler=scheduler)
    return sample_teacher(teacher, noise, grid=grid, cond=conditions(labels, table))


def student_samples(
    student: nn.Module,
    table: tuple[Tensor, Tensor],
    labels: Tensor,
    *,
    steps: int,
    seed: int,
    scheduler: Mapping[str, Any] | None = None,
) -> Tensor:
    """The student's ``steps``-step samples ``(N, 1, SIZE, SIZE)`` of ``labels``."""
    cond = conditions(labels, table)
    cond = {k: cond[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}
    with torch.no_grad():
        return generate_latents(
            student, cond, height=SIZE, width=SIZE, steps=steps, seed=seed, scheduler=scheduler
        )


def pixel_distance(a: Tensor, b: Tensor) -> float:
    """Root-mean-square difference per pixel of two sample sets from the same noise (in the
    latent scale [-1, 1])."""
    return float((a.float() - b.float()).square().mean().sqrt())
