"""Small MLPs for the toys: a MeanFlow student ``u(z, r, t)`` and a velocity field ``v(z, t)``.

Times enter through random-free Fourier features (sines and cosines of geometrically spaced
frequencies, as the sinusoidal embeddings of Vaswani et al., arXiv 1706.03762); the student
sees ``t`` and the interval length ``t - r`` (MeanFlow's choice, arXiv 2505.13447, Table 1c).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mfcore._checks import check_positive_int, check_tensor

__all__ = ["FourierTime", "MeanFlowMLP", "VelocityMLP"]


class FourierTime(nn.Module):
    """Features ``[sin(2 pi f_k t), cos(2 pi f_k t)]``, ``f_k`` geometric from 1/2 to ``max_freq``.

    Args:
        features: number of frequencies ``F`` (output ``2 F`` features).
        max_freq: highest frequency.

    Call: ``(B,) -> (B, 2 F)``.
    """

    def __init__(self, features: int = 8, max_freq: float = 32.0) -> None:
        super().__init__()
        check_positive_int("features", features)
        freqs = torch.logspace(math.log10(0.5), math.log10(max_freq), features)
        self.register_buffer("freqs", 2.0 * math.pi * freqs)

    def forward(self, t: Tensor) -> Tensor:
        angle = t[:, None].to(self.freqs.dtype) * self.freqs
        return torch.cat([angle.sin(), angle.cos()], dim=1).to(t.dtype)


def _mlp(inputs: int, hidden: int, depth: int, outputs: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(inputs, hidden), nn.SiLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), nn.SiLU()]
    layers.append(nn.Linear(hidden, outputs))
    return nn.Sequential(*layers)


def _check_points(z: Tensor, dim: int) -> None:
    check_tensor("z", z)
    if z.ndim != 2 or z.shape[1] != dim:
        raise ValueError(f"z must have shape (B, {dim}), got {tuple(z.shape)}")


class MeanFlowMLP(nn.Module):
    """MeanFlow student ``u(z, r, t)`` for points ``z`` of shape ``(B, D)``.

    ``u = MLP([z, phi(t), phi(t - r)])`` with :class:`FourierTime` features ``phi``.

    Args:
        dim: data dimension ``D``.
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        features: Fourier frequencies per time input.
    """

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, features: int = 8) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.embed = FourierTime(features)
        self.net = _mlp(dim + 4 * features, hidden, check_positive_int("depth", depth), dim)

    def forward(self, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        _check_points(z, self.dim)
        h = torch.cat([z, self.embed(t), self.embed(t - r)], dim=1)
        return self.net(h)


class VelocityMLP(nn.Module):
    """Velocity field ``v(z, t)`` for points ``(B, D)``: ``MLP([z, phi(t)])`` (a critic's fake).

    Args:
        dim: data dimension ``D``.
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        features: Fourier frequencies of ``t``.
    """

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, features: int = 8) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.embed = FourierTime(features)
        self.net = _mlp(dim + 2 * features, hidden, check_positive_int("depth", depth), dim)

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        _check_points(z, self.dim)
        return self.net(torch.cat([z, self.embed(t)], dim=1))
