"""Small deterministic student networks shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class MLPStudent(nn.Module):
    """``u(z, r, t)`` as an MLP on ``[z, r, t - r]``, for ``z`` of shape ``(B, D)``."""

    def __init__(self, dim: int, hidden: int = 32, act: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 2, hidden),
            act(),
            nn.Linear(hidden, hidden),
            act(),
            nn.Linear(hidden, dim),
        )

    def forward(self, z, r, t, scale=1.0):
        return scale * self.net(torch.cat([z, r[:, None], (t - r)[:, None]], dim=1))


class MixerStudent(nn.Module):
    """An attention-free token mixer for ``z`` of shape ``(B, S, C)``: LayerNorm, a mixing
    MLP across tokens, a channel MLP, and times through a FiLM-style modulation."""

    def __init__(self, seq: int, ch: int, hidden: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(ch)
        self.token = nn.Sequential(nn.Linear(seq, hidden), nn.GELU(), nn.Linear(hidden, seq))
        self.channel = nn.Sequential(nn.Linear(ch, hidden), nn.GELU(), nn.Linear(hidden, ch))
        self.time = nn.Linear(2, 2 * ch)

    def forward(self, z, r, t):
        scale, shift = self.time(torch.stack([t, t - r], dim=1)).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm(z) * (1 + scale) + shift
        h = h + self.token(h.transpose(1, 2)).transpose(1, 2)
        return self.channel(h) + z * torch.sin(3 * t)[:, None, None]
