"""The zero-initialised embedding of the interval ``t - r`` that turns a teacher into a student.

A MeanFlow student ``u(z, r, t)`` (arXiv 2505.13447) needs the second time ``r``. The adapter
core adds ``e(t - r)`` to the output of the family's time-conditioning module(s) through a
forward hook, with

    e(d) = M(phi(s d)) - M(phi(0)),

``phi`` a sinusoidal projection and ``M`` a small MLP whose last linear layer starts at zero,
``s`` the model's time scale (1000 for sigma * 1000). So ``e = 0`` before training (the
student equals the teacher bit for bit, for every ``r``) and ``e(0) = 0`` always: at
``r = t`` the student is its LoRA model alone, which stock diffusers can load.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mfcore._checks import check_real

__all__ = ["IntervalEmbedding", "diffusers_interval_embedding"]


class IntervalEmbedding(nn.Module):
    """``e(d) = M(phi(scale d)) - M(phi(0))`` for intervals ``d = t - r`` ``(B,)``.

    Args:
        time_proj: ``phi``, a parameter-free module ``(B,) -> (B, F)`` (``nn.Identity`` when
            ``mlp`` embeds raw times itself).
        mlp: ``M``, ``(B, F) -> (B, D)``; its last ``nn.Linear`` is zeroed here. Build it from
            the family's own time-embedding MLP (a fresh module, never the model's own), so
            its first layer starts as the model's.
        scale: the model's time units per unit of mfcore time (1000 for ``sigma * 1000``).
    """

    def __init__(self, time_proj: nn.Module, mlp: nn.Module, *, scale: float = 1000.0) -> None:
        super().__init__()
        self.time_proj = time_proj
        self.mlp = mlp
        self.scale = check_real("scale", scale, minimum=0.0, strict=True)
        linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise TypeError("mlp must hold an nn.Linear (its last one is zero-initialised)")
        nn.init.zeros_(linears[-1].weight)
        if linears[-1].bias is not None:
            nn.init.zeros_(linears[-1].bias)

    def forward(self, delta: Tensor) -> Tensor:
        """Embed intervals ``delta`` ``(B,)`` in ``[0, 1]`` into ``(B, D)``."""
        d = torch.cat([delta, delta.new_zeros(1)]) * self.scale  # M(phi(0)) in the same batch
        h = self.mlp(self.time_proj(d).to(next(self.mlp.parameters()).dtype))
        return h[:-1] - h[-1:]


def diffusers_interval_embedding(
    time_proj: nn.Module, timestep_embedder: nn.Module
) -> IntervalEmbedding:
    """The interval embedding of a diffusers model that embeds times with ``Timesteps`` and a
    ``TimestepEmbedding`` MLP (FLUX, HunyuanImage 2.1).

    ``phi`` reuses ``time_proj``'s settings (not its object) and ``M`` is a fresh
    ``TimestepEmbedding`` whose first layer starts as ``timestep_embedder``'s; times are
    ``1000 d``, the units of both families' time projections.
    """
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps

    proj = Timesteps(
        num_channels=time_proj.num_channels,
        flip_sin_to_cos=time_proj.flip_sin_to_cos,
        downscale_freq_shift=time_proj.downscale_freq_shift,
        scale=time_proj.scale,
    )
    lin1 = timestep_embedder.linear_1
    mlp = TimestepEmbedding(
        in_channels=lin1.in_features, time_embed_dim=timestep_embedder.linear_2.out_features
    ).to(device=lin1.weight.device, dtype=lin1.weight.dtype)
    with torch.no_grad():
        mlp.linear_1.weight.copy_(lin1.weight)
        mlp.linear_1.bias.copy_(lin1.bias)
    return IntervalEmbedding(proj, mlp, scale=1000.0)
