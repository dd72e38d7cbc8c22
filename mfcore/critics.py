"""Trajectory distribution alignment: critics that pull a few-step student toward the teacher.

MeanFlow regression alone is mean-seeking at one or two steps on multi-modal targets
(arXiv 2605.17834, Sec. 4): where the teacher's flow map is nearly discontinuous the
student averages it and puts samples between the modes. These objectives add a
*distribution-level* signal on the states of the student's own K-step trajectory
``z_{t_0} = eps, z_{t_1}, ..., z_{t_K}`` (grid ``1 = t_0 > ... > t_K = 0``), so every
segment end ``z_{t_{i+1}}`` is pushed toward the teacher's marginal at ``t_{i+1}``
(trajectory distribution matching, TDM, arXiv 2503.06674).

One concept per module, gathered here:

- :mod:`mfcore.renoise`: moving a state ``z_r`` to ``s >= r`` along the path, the velocity of
  that transition (the velocity critics' flow-matching target) and the surrogate loss that
  injects a gradient;
- :mod:`mfcore.velocity_critics`: :class:`FakeVelocityCritic` (DMD, arXiv 2311.18828; TDM) and
  :class:`MeanFlowCritic` (Mean Flow Distillation, arXiv 2606.11155), a fake velocity
  network trained on the student's re-noised states;
- :mod:`mfcore.kernel_critic`: :class:`KernelCritic`, no network: the squared MMD or the
  energy distance between the student's states and noised teacher samples;
- :mod:`mfcore.alignment_loss`: :class:`AlignmentLoss`, which runs the student's K-step
  sampler (:func:`mfcore.solvers.sample_meanflow` with ``enable_grad=True``) and applies a
  critic at every segment end; ``critic_step(...)`` and ``student_loss(...)`` each return
  ``(loss, metrics)``, and the seed method trains ``MeanFlowLoss + lambda * AlignmentLoss``.

Every draw takes a :class:`~mfcore.draws.BatchRows` in place of a generator, so a
data-parallel run draws what one process would for the global batch. The velocity critics'
losses are batch means of per-sample terms (data parallelism averages them exactly); the
kernel critic's is not (:mod:`mfcore.kernel_critic` says how to gather it).
"""

from __future__ import annotations

from mfcore.alignment_loss import AlignmentLoss
from mfcore.kernel_critic import KERNELS, KernelCritic, kernel_discrepancy
from mfcore.renoise import renoise, renoise_velocity, renoise_weight, surrogate_loss
from mfcore.velocity_critics import FakeVelocityCritic, MeanFlowCritic

__all__ = [
    "renoise",
    "renoise_velocity",
    "renoise_weight",
    "surrogate_loss",
    "kernel_discrepancy",
    "KERNELS",
    "FakeVelocityCritic",
    "MeanFlowCritic",
    "KernelCritic",
    "AlignmentLoss",
]
