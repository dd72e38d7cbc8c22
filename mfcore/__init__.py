"""mfcore: MeanFlow few-step distillation of flow-matching models.

Conventions (see docs/concepts.md): ``z_t = (1 - t) x + t eps`` with t = 0 data and t = 1
noise, ``v = eps - x``, and one student step ``z_r = z_t - (t - r) u(z_t, r, t)``; times
are ``(B,)`` tensors.

Modules, one concept each:

- :mod:`mfcore.fields`: the model contracts ``VelocityField`` and ``MeanVelocityField``;
- :mod:`mfcore.time`: time samplers, shifts, ``(r, t)`` pairs and sampling grids;
- :mod:`mfcore.jvp`: the total derivative ``du/dt`` along ``(v, 0, 1)``;
- :mod:`mfcore.attention`: attention that forward-mode AD can differentiate;
- :mod:`mfcore.targets`: MeanFlow targets and the warm-up switch;
- :mod:`mfcore.losses`: ``MeanFlowLoss``, ``FlowMatchingLoss``, ``AdaptiveWeight``;
- :mod:`mfcore.critics`: trajectory distribution alignment (``AlignmentLoss``);
- :mod:`mfcore.guidance`: classifier-free guidance;
- :mod:`mfcore.solvers`: ODE solvers and few-step samplers;
- :mod:`mfcore.arcflow`: the ArcFlow momentum-mixture student.

``mfcore.toys`` (exact Gaussian-mixture teachers, metrics, the toy job) and
``mfcore.adapters`` (diffusers FLUX with LoRA) are optional subpackages.
"""

from mfcore.fields import MeanVelocityField, VelocityField

__version__ = "0.1.0"
__all__ = ["MeanVelocityField", "VelocityField", "__version__"]
