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


def peer_guidance(key: str, **kw):
    """mfcore's ``MeanFlowGuidance`` for the guided case ``key``, with the peers' window."""
    from mfcore.guidance import MeanFlowGuidance

    case, data = peer_data()["cases"][key], peer_data()
    window, null = data["window"], data["model"]["null_class"]
    kw = {"t_min": window["t_min"], "t_max": window["t_max"], **kw}
    kw.setdefault("label_dropout", case["label_dropout"])
    return MeanFlowGuidance(case["omega"], case["kappa"], uncond={"y": null}, **kw)


def fastgen_opt_grad_grads(key: str, *, p: float, c: float) -> list[Tensor]:
    """FastGen's ``loss_type="opt_grad"`` gradient on case ``key``, by hand, fp64.

    FastGen (``_mf_pred_to_loss``) takes ``tangent = u_tgt - sg(u)``, the detached weight
    ``w = 1 / (||tangent|| + c)^p`` (``norm_method="poly_<p>"``, ``norm_const=c``) and the
    loss ``mean ||u - sg(u + w tangent)||^2``, whose gradient in ``u`` is
    ``2 w (u - u_tgt) / B``. ``u_tgt`` is FastGen's own, stored for the case.
    """
    d, case = peer_inputs(), peer_data()["cases"][key]
    u_tgt = torch.tensor(case["peers"]["fastgen"]["u_tgt"], dtype=F64)
    student = peer_student()
    z = (1 - d["t"][:, None]) * d["x"] + d["t"][:, None] * d["eps"]
    y = torch.where(d["drop"], peer_data()["model"]["null_class"], d["y"])
    u = student(z, d["r"], d["t"], y)
    tangent = u_tgt - u.detach()
    w = (tangent.norm(dim=1) + c) ** -p
    loss = ((u - (u + w[:, None] * tangent).detach()) ** 2).sum(1).mean()
    return list(torch.autograd.grad(loss, list(student.parameters())))


def mfcore_grads(key: str, weighting) -> list[Tensor]:
    """The gradient of mfcore's ``MeanFlowLoss(weighting=...)`` on case ``key``, fp64."""
    from mfcore.losses import MeanFlowLoss

    d, student = peer_inputs(), peer_student()
    loss_fn = MeanFlowLoss(weighting=weighting, guidance=peer_guidance(key))
    loss, _ = loss_fn(
        student, d["x"], noise=d["eps"], cond={"y": d["y"]}, r=d["r"], t=d["t"], cond_drop=d["drop"]
    )
    return list(torch.autograd.grad(loss, list(student.parameters())))


def fastgen_gradient_gap(weighting, *, p: float, c: float, key: str = "w1.0_k0.5/l2") -> float:
    """Largest relative gap between mfcore's gradient with ``weighting`` and FastGen's
    ``opt_grad`` gradient (:func:`fastgen_opt_grad_grads`) over the student's parameters."""
    ours, theirs = mfcore_grads(key, weighting), fastgen_opt_grad_grads(key, p=p, c=c)
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(ours, theirs, strict=True))
