"""The students the CPU benchmarks time: a 4-layer MLP (width 512) on ``(B, D)`` states and a
4-block DiT-like transformer (width 256, 4 heads) on ``(B, S, C)`` tokens, attention through
:mod:`mfcore.attention`, ``(r, t)`` through an adaptive norm."""

from __future__ import annotations

import torch
from torch import nn

from mfcore.attention import attention


class MLP(nn.Module):
    def __init__(self, dim=64, hidden=512, depth=4):
        super().__init__()
        layers, width = [], dim + 2
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(hidden, dim))

    def forward(self, z, r, t):
        return self.net(torch.cat([z, r[:, None], (t - r)[:, None]], 1))


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.mod = nn.Linear(width, 2 * width)

    def forward(self, h, emb):
        b, s, w = h.shape
        scale, shift = self.mod(emb).unsqueeze(1).chunk(2, -1)
        x = self.norm1(h) * (1 + scale) + shift
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = attention(q, k, v).transpose(1, 2).reshape(b, s, w)
        h = h + self.out(a)
        return h + self.mlp(self.norm2(h))


class Transformer(nn.Module):
    """A DiT-like student on tokens ``(B, S, C)`` with (r, t) through adaptive norms."""

    def __init__(self, ch=16, width=256, heads=4, depth=4):
        super().__init__()
        self.inp, self.outp = nn.Linear(ch, width), nn.Linear(width, ch)
        self.time = nn.Sequential(nn.Linear(2, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))

    def forward(self, z, r, t):
        emb = self.time(torch.stack([t, t - r], 1))
        h = self.inp(z)
        for blk in self.blocks:
            h = blk(h, emb)
        return self.outp(h)
