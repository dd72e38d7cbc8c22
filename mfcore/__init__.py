"""mfcore: MeanFlow few-step distillation of flow-matching models.

Conventions (see docs/concepts.md): ``z_t = (1 - t) x + t eps`` with t = 0 data and t = 1
noise, ``v = eps - x``, and one student step ``z_r = z_t - (t - r) u(z_t, r, t)``.

Modules: :mod:`mfcore.time` (time samplers and grids), :mod:`mfcore.jvp` (the total
derivative ``du/dt``), :mod:`mfcore.targets` (MeanFlow targets and the warm-up switch),
:mod:`mfcore.losses` (MeanFlowLoss, FlowMatchingLoss), :mod:`mfcore.guidance`
(classifier-free guidance), :mod:`mfcore.solvers` (ODE solvers and few-step samplers),
:mod:`mfcore.fields` (the model contracts).
"""

from mfcore.fields import MeanVelocityField, VelocityField

__version__ = "0.1.0"
__all__ = ["MeanVelocityField", "VelocityField", "__version__"]
