"""Small MLPs for the toys: a MeanFlow student ``u(z, r, t)`` and a velocity field ``v(z, t)``.

Times enter through random-free Fourier features (sines and cosines of geometrically spaced
frequencies, as the sinusoidal embeddings of Vaswani et al., arXiv 1706.03762); the student
sees ``t`` and the interval length ``t - r`` (MeanFlow's choice, arXiv 2505.13447, Table 1c).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from mfcore._checks import check_choice, check_positive_int, check_real, check_tensor

__all__ = [
    "FourierTime",
    "FourierPoints",
    "MeanFlowMLP",
    "VelocityMLP",
    "IntervalStudent",
    "activation",
]


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
        check_real("max_freq", max_freq, minimum=0.0, strict=True)
        freqs = torch.logspace(math.log10(0.5), math.log10(max_freq), features)
        self.register_buffer("freqs", 2.0 * math.pi * freqs)

    def forward(self, t: Tensor) -> Tensor:
        angle = t[:, None].to(self.freqs.dtype) * self.freqs
        return torch.cat([angle.sin(), angle.cos()], dim=1).to(t.dtype)


_ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}


def activation(act: str) -> nn.Module:
    """A fresh activation module by name: ``"silu"``, ``"relu"`` or ``"gelu"``."""
    check_choice("act", act, tuple(_ACTIVATIONS))
    return _ACTIVATIONS[act]()


def _mlp(inputs: int, hidden: int, depth: int, outputs: int, act: str = "silu") -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(inputs, hidden), activation(act)]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), activation(act)]
    layers.append(nn.Linear(hidden, outputs))
    return nn.Sequential(*layers)


def _check_points(z: Tensor, dim: int) -> None:
    check_tensor("z", z)
    if z.ndim != 2 or z.shape[1] != dim:
        raise ValueError(f"z must have shape (B, {dim}), got {tuple(z.shape)}")


class FourierPoints(nn.Module):
    """Fixed random Fourier features of points, ``[z, sin(z B), cos(z B)]`` (Tancik et al.,
    arXiv 2006.10739): they let a small MLP draw sharp boundaries between modes.

    ``B`` is ``(D, F)`` with ``N(0, scale^2)`` entries drawn from a fixed seed (a buffer, so
    it is part of the state dict). ``F = 0`` is the identity.

    Call: ``(B, D) -> (B, D + 2 F)``.
    """

    def __init__(self, dim: int, features: int = 0, scale: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", scale * torch.randn(dim, features, generator=gen))
        self.out_features = dim + 2 * features

    def forward(self, z: Tensor) -> Tensor:
        if self.proj.shape[1] == 0:
            return z
        angle = z @ self.proj.to(z.dtype)
        return torch.cat([z, angle.sin(), angle.cos()], dim=1)


class MeanFlowMLP(nn.Module):
    """MeanFlow student ``u(z, r, t)`` for points ``z`` of shape ``(B, D)``.

    ``u = MLP([z, phi(t), phi(t - r)])`` with :class:`FourierTime` features ``phi``.

    Args:
        dim: data dimension ``D``.
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        features: Fourier frequencies per time input.
        act: activation, ``"silu"``, ``"relu"`` or ``"gelu"``.
        point_features: random Fourier features of ``z`` (:class:`FourierPoints`; 0: none).
        point_scale: their frequency scale.
        max_freq: the highest time frequency (:class:`FourierTime`).
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 256,
        depth: int = 3,
        features: int = 8,
        act: str = "silu",
        point_features: int = 0,
        point_scale: float = 1.0,
        max_freq: float = 32.0,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.embed = FourierTime(features, max_freq)
        self.points = FourierPoints(dim, point_features, point_scale)
        inputs = self.points.out_features + 4 * features
        self.net = _mlp(inputs, hidden, check_positive_int("depth", depth), dim, act)

    def forward(self, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        _check_points(z, self.dim)
        h = torch.cat([self.points(z), self.embed(t), self.embed(t - r)], dim=1)
        return self.net(h)


class VelocityMLP(nn.Module):
    """Velocity field ``v(z, t)`` for points ``(B, D)``: ``MLP([z, phi(t)])`` (a critic's fake,
    or the faithful toy's teacher network).

    Args:
        dim: data dimension ``D``.
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        features: Fourier frequencies of ``t``.
        max_freq: the highest of them (:class:`FourierTime`).
        act: activation, ``"silu"``, ``"relu"`` or ``"gelu"``.
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 256,
        depth: int = 3,
        features: int = 8,
        *,
        max_freq: float = 32.0,
        act: str = "silu",
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.embed = FourierTime(features, max_freq)
        self.net = _mlp(dim + 2 * features, hidden, check_positive_int("depth", depth), dim, act)

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        _check_points(z, self.dim)
        return self.net(torch.cat([z, self.embed(t)], dim=1))


class IntervalStudent(nn.Module):
    """A MeanFlow student ``u(z, r, t)`` grown from a velocity network ``v(z, t)``: a copy of
    it plus a zero-initialised interval input, so ``u(z, r, t) = v(z, t)`` exactly for every
    ``r`` before training (what the FLUX adapter does at scale with its interval embedding).

    The interval enters the first layer: ``h_1 = W [z, phi(t)] + b + W_int phi_int(t - r)``
    with ``W_int = 0`` at init and :class:`FourierTime` features ``phi_int``.

    Args:
        teacher: the :class:`VelocityMLP` to copy (left untouched).
        features: Fourier frequencies of the interval ``t - r``.
        max_freq: the highest of them (default: the teacher's time features').
    """

    def __init__(
        self, teacher: VelocityMLP, features: int | None = None, max_freq: float | None = None
    ) -> None:
        super().__init__()
        if not isinstance(teacher, VelocityMLP):
            raise TypeError(f"teacher must be a VelocityMLP, got {type(teacher).__name__}")
        self.dim = teacher.dim
        self.embed = copy.deepcopy(teacher.embed)
        self.net = copy.deepcopy(teacher.net)
        n = features if features is not None else self.embed.freqs.numel()
        top = float(self.embed.freqs.max()) / (2.0 * math.pi)
        self.interval_embed = FourierTime(n, top if max_freq is None else max_freq)
        first = self.net[0]
        self.interval = nn.Linear(2 * n, first.out_features, bias=False)
        nn.init.zeros_(self.interval.weight)
        self.interval.to(device=first.weight.device, dtype=first.weight.dtype)

    def forward(self, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        _check_points(z, self.dim)
        h = self.net[0](torch.cat([z, self.embed(t)], dim=1))
        h = h + self.interval(self.interval_embed(t - r))
        return self.net[1:](h)
