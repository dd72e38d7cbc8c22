"""Guided MeanFlow training: the peers' reference values, their tiny model, and the
equations (MeanFlow, arXiv 2505.13447, eqs. 10, 21, 22) written out by hand.

``data/cfg_peers.json`` holds numbers only: each peer's own loss code was run once, offline,
on the fixed fp64 inputs stored there (provenance in the file).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn

F64 = torch.float64
PATH = Path(__file__).parent / "data" / "cfg_peers.json"


@cache
def peer_data() -> dict:
    return json.loads(PATH.read_text())


class TinyStudent(nn.Module):
    """``u(z, r, t, y) = tanh(z W1 + t wt + (t - r) wh + E[y] + b1) W2 + b2``, ``z`` ``(B, D)``."""

    def __init__(self, weights: dict[str, Tensor]) -> None:
        super().__init__()
        for name, value in weights.items():
            setattr(self, name, nn.Parameter(value.clone()))

    def pre(self, z: Tensor, r: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return z @ self.W1 + t[:, None] * self.wt + (t - r)[:, None] * self.wh + self.E[y] + self.b1

    def forward(self, z: Tensor, r: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return torch.tanh(self.pre(z, r, t, y)) @ self.W2 + self.b2


def peer_student() -> TinyStudent:
    weights = peer_data()["model"]["weights"]
    return TinyStudent({k: torch.tensor(v, dtype=F64) for k, v in weights.items()})


def peer_inputs() -> dict[str, Tensor]:
    raw = peer_data()["inputs"]
    out = {k: torch.tensor(raw[k], dtype=F64) for k in ("x", "eps", "t", "r")}
    out["y"] = torch.tensor(raw["labels"])
    out["drop"] = torch.tensor(raw["drop_mask"])
    return out


def reference_loss(
    student: TinyStudent,
    x: Tensor,
    eps: Tensor,
    r: Tensor,
    t: Tensor,
    y: Tensor,
    *,
    p: float,
    c: float,
    omega: float = 1.0,
    kappa: float = 0.0,
    null: int = 3,
    guided: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, u_tgt, v_tilde)`` straight from the paper, with ``du/dt`` in closed form.

    ``y`` is the label the student sees (``null`` on the dropped rows); ``v_tilde`` is
    eq. 21 on the rows of ``guided`` and ``v`` elsewhere (``None`` guides none).
    With ``a`` the tanh's input, ``da/dt`` along ``(v_tilde, 0, 1)`` is
    ``v_tilde W1 + wt + wh``, so ``du/dt = ((1 - tanh(a)^2) da/dt) W2``;
    ``u_tgt = v_tilde - (t - r) du/dt`` (eq. 10) and the loss is
    ``mean(sg(1 / (L + c)^p) L)``, ``L = ||u - u_tgt||^2`` (eq. 22).
    """
    with torch.no_grad():
        z = (1 - t[:, None]) * x + t[:, None] * eps
        v = eps - x
        v_tilde = v
        if guided is not None:
            mix = (
                omega * v
                + kappa * student(z, t, t, y)
                + (1 - omega - kappa) * student(z, t, t, torch.full_like(y, null))
            )
            v_tilde = torch.where(guided[:, None], mix, v)
        a = student.pre(z, r, t, y)
        da_dt = v_tilde @ student.W1 + student.wt + student.wh
        du_dt = ((1 - torch.tanh(a) ** 2) * da_dt) @ student.W2
        u_tgt = v_tilde - (t - r)[:, None] * du_dt
        sq = ((student(z, r, t, y) - u_tgt) ** 2).sum(1)
        loss = ((sq + c) ** -p * sq).mean()
    return loss, u_tgt, v_tilde
