"""The reference path of :func:`mfcore.attention.attention`: exact torch code, chunked over
query rows (O(S x block) memory, any device and dtype; fp64 for tests).

With ``O = softmax(S) V``, ``S = scale Q K^T + M`` and ``P = softmax(S)``, per block of query
rows: the output and logsumexp (:func:`reference_forward`), the tangent
``dO = (P * dS) V + P dV - rowsum(P * dS) O`` (:func:`reference_tangent`, or with the output
in one pass) and the gradients ``dQ = scale dS K``, ``dK = scale dS^T Q``, ``dV = P^T G``
with ``dS = P * (G V^T - rowsum(G * O))`` (:func:`reference_backward`); derivation in
``docs/attention.md``. Computed in fp32 at least (fp64 stays fp64); the logsumexp of an
all-masked row is +inf, so ``exp(S - lse) = 0`` there.

A :class:`ScoreSpec` holds the scale, the block size and the mask, normalised: ``kind``
``"none"``, ``"keys"`` (a ``(B, S_k)`` boolean key-padding mask), ``"bool"`` or ``"float"``
(4-D, broadcast to ``(B, H, S_q, S_k)``; True keeps, a float mask is added to the scores).
Shapes: ``q (B, H, S_q, D)``, ``k (B, H, S_k, D)``, ``v (B, H, S_k, D_v)``, output ``(B, H,
S_q, D_v)``, logsumexp ``(B, H, S_q)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from mfcore.path import compute_dtype

__all__ = ["ScoreSpec", "reference_forward", "reference_tangent", "reference_backward"]

# Reference path: rows per query block are chosen so one block of scores holds about this
# many elements (16 MiB in fp32), and never fewer than _MIN_ROWS rows.
_BLOCK_ELEMENTS = 1 << 22
_MIN_ROWS = 16

Tangents = tuple[Tensor | None, ...]
"""``(dQ, dK, dV)``, any of them None (no tangent)."""
Saved = tuple[Tensor, ...]
"""``(Q, K, V, O, lse)``: what a forward keeps for its tangent and backward."""


@dataclass(frozen=True)
class ScoreSpec:
    """How the scores ``S = scale Q K^T + M`` of one call are formed, block by block.

    Attributes:
        kind: ``"none"``, ``"keys"``, ``"bool"`` or ``"float"`` (see the module docstring).
        mask: the normalised mask (None for ``"none"``).
        scale: the score scale.
        chunk_size: query rows per block; None chooses it from the sizes.
    """

    kind: str = "none"
    mask: Tensor | None = None
    scale: float = 1.0
    chunk_size: int | None = None

    @property
    def key_mask(self) -> Tensor | None:
        """The ``(B, S_k)`` boolean key-padding mask, the only mask the Triton path takes."""
        return self.mask if self.kind == "keys" else None

    def blocks(self, q: Tensor, s_k: int) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` of each block of query rows."""
        rows = self.chunk_size
        if rows is None:
            per_row = max(1, q.shape[0] * q.shape[1] * s_k)
            rows = max(_MIN_ROWS, _BLOCK_ELEMENTS // per_row)
        s_q = q.shape[2]
        return ((start, min(start + rows, s_q)) for start in range(0, s_q, rows))

    def scores(self, qc: Tensor, kc: Tensor, start: int, stop: int) -> Tensor:
        """Masked scores ``(B, H, stop - start, S_k)`` of query rows ``start:stop``."""
        scores = torch.matmul(qc, kc.transpose(-1, -2)) * self.scale
        if self.kind == "none":
            return scores
        assert self.mask is not None
        if self.kind == "keys":
            return scores.masked_fill(~self.mask[:, None, None, :], -math.inf)
        rows = self.mask if self.mask.shape[2] == 1 else self.mask[:, :, start:stop]
        if self.kind == "bool":
            return scores.masked_fill(~rows, -math.inf)
        return scores + rows.to(scores.dtype)


def _lse(scores: Tensor) -> Tensor:
    """Row logsumexp of ``scores``, +inf for rows with no finite score."""
    lse = torch.logsumexp(scores, dim=-1)
    return torch.where(torch.isneginf(lse), math.inf, lse)


def _tangent_block(
    p: Tensor, o: Tensor, qc: Tensor, kv: tuple[Tensor, Tensor], tangents: Tangents, *, scale: float
) -> Tensor:
    """``dO = (P * dS) V + P dV - rowsum(P * dS) O`` for one row block (compute dtype).

    ``kv`` is ``(K, V)``; ``tangents`` is ``(dQ, dK, dV)`` with ``dQ`` of the block's rows.
    """
    k, v = kv
    tq, tk, tv = tangents
    # The score tangent from the tangents present (no zero block), one score block at a time.
    ds = None if tq is None else torch.matmul(tq, k.transpose(-1, -2))
    if tk is not None:
        ds = (
            torch.matmul(qc, tk.transpose(-1, -2))
            if ds is None
            else ds.add_(torch.matmul(qc, tk.transpose(-1, -2)))
        )
    out = None
    if ds is not None:
        pds = ds.mul_(p).mul_(scale)
        out = torch.matmul(pds, v) - pds.sum(-1, keepdim=True) * o
        del ds, pds
    if tv is not None:
        out = torch.matmul(p, tv) if out is None else out.add_(torch.matmul(p, tv))
    return torch.zeros_like(o) if out is None else out


def _cast(x: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if x is None else x.to(dtype)


def reference_forward(
    q: Tensor, k: Tensor, v: Tensor, tangents: Tangents | None, spec: ScoreSpec
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Output, logsumexp and (when ``tangents = (dQ, dK, dV)`` is given) the tangent."""
    cdt = compute_dtype(q.dtype)
    kv = (k.to(cdt), v.to(cdt))
    tq, tk, tv = (None, None, None) if tangents is None else tangents
    tk, tv = _cast(tk, cdt), _cast(tv, cdt)
    outs, lses, touts = [], [], []
    for start, stop in spec.blocks(q, k.shape[2]):
        qc = q[:, :, start:stop].to(cdt)
        scores = spec.scores(qc, kv[0], start, stop)
        lse = _lse(scores)
        p = torch.exp(scores - lse[..., None])
        o = torch.matmul(p, kv[1])
        outs.append(o.to(q.dtype))
        lses.append(lse)
        if tangents is not None:
            tqc = None if tq is None else tq[:, :, start:stop].to(cdt)
            tangent = _tangent_block(p, o, qc, kv, (tqc, tk, tv), scale=spec.scale)
            touts.append(tangent.to(q.dtype))
    tout = torch.cat(touts, dim=2) if tangents is not None else None
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2), tout


def reference_tangent(saved: Saved, tangents: Tangents, spec: ScoreSpec) -> Tensor:
    """Tangent of the output from ``saved = (Q, K, V, O, lse)``, block by block."""
    q, k, v, o, lse = saved
    tq, tk, tv = tangents
    cdt = compute_dtype(q.dtype)
    kv, tk, tv = (k.to(cdt), v.to(cdt)), _cast(tk, cdt), _cast(tv, cdt)
    touts = []
    for start, stop in spec.blocks(q, k.shape[2]):
        qc = q[:, :, start:stop].to(cdt)
        p = torch.exp(spec.scores(qc, kv[0], start, stop) - lse[:, :, start:stop, None])
        tqc = None if tq is None else tq[:, :, start:stop].to(cdt)
        oc = o[:, :, start:stop].to(cdt)
        tangent = _tangent_block(p, oc, qc, kv, (tqc, tk, tv), scale=spec.scale)
        touts.append(tangent.to(q.dtype))
    return torch.cat(touts, dim=2)


def reference_backward(
    saved: Saved, grad_o: Tensor, spec: ScoreSpec
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``<grad_o, O>`` with respect to q, k, v, from ``saved = (Q, K, V, O, lse)``.

    ``dP = grad_o V^T``, ``dS = P * (dP - rowsum(grad_o * O))``, then
    ``grad_q = scale dS K``, ``grad_k = scale dS^T Q``, ``grad_v = P^T grad_o``.
    """
    q, k, v, o, lse = saved
    cdt = compute_dtype(q.dtype)
    k32, v32 = k.to(cdt), v.to(cdt)
    grad_k, grad_v = torch.zeros_like(k32), torch.zeros_like(v32)
    grad_qs = []
    for start, stop in spec.blocks(q, k.shape[2]):
        qc, gc = q[:, :, start:stop].to(cdt), grad_o[:, :, start:stop].to(cdt)
        p = torch.exp(spec.scores(qc, k32, start, stop) - lse[:, :, start:stop, None])
        delta = (gc * o[:, :, start:stop].to(cdt)).sum(-1, keepdim=True)
        ds = p * (torch.matmul(gc, v32.transpose(-1, -2)) - delta) * spec.scale
        grad_qs.append(torch.matmul(ds, k32).to(q.dtype))
        grad_k += torch.matmul(ds.transpose(-1, -2), qc)
        grad_v += torch.matmul(p.transpose(-1, -2), gc)
    return torch.cat(grad_qs, dim=2), grad_k.to(k.dtype), grad_v.to(v.dtype)
