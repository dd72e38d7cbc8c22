"""The reference path of :func:`mfcore.attention.attention`: exact torch code, chunked over
query rows (O(S x block) memory, any device and dtype; fp64 for tests).

With ``O = softmax(S) V``, ``S = scale Q K^T + M`` and ``P = softmax(S)``, per block of query
rows: the output and logsumexp (:func:`reference_forward`), the tangent
``dO = (P * dS) V + P dV - rowsum(P * dS) O`` (:func:`reference_tangent`, or with the output
in one pass) and the gradients ``dQ = scale dS K``, ``dK = scale dS^T Q``, ``dV = P^T G``
with ``dS = P * (G V^T - rowsum(G * O))`` (:func:`reference_backward`); derivation in
``docs/attention.md``. Computed in fp32 at least (fp64 stays fp64); the logsumexp of an
all-masked row is +inf, so ``exp(S - lse) = 0`` there.

Masks arrive normalised as ``(kind, mask)``: ``kind`` ``"none"``, ``"keys"`` (a ``(B, S_k)``
boolean key-padding mask), ``"bool"`` or ``"float"`` (4-D, broadcast to ``(B, H, S_q, S_k)``;
True keeps, a float mask is added to the scores). Shapes: ``q (B, H, S_q, D)``,
``k (B, H, S_k, D)``, ``v (B, H, S_k, D_v)``, output ``(B, H, S_q, D_v)``, logsumexp
``(B, H, S_q)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mfcore.path import compute_dtype

__all__ = ["reference_forward", "reference_tangent", "reference_backward"]

# Reference path: rows per query block are chosen so one block of scores holds about this
# many elements (16 MiB in fp32), and never fewer than _MIN_ROWS rows.
_BLOCK_ELEMENTS = 1 << 22
_MIN_ROWS = 16


def _mask_rows(kind: str, mask: Tensor | None, start: int, stop: int) -> Tensor | None:
    """The part of a normalised mask that applies to query rows ``start:stop``."""
    if kind == "none" or kind == "keys":
        return mask
    assert mask is not None
    return mask if mask.shape[2] == 1 else mask[:, :, start:stop]


def _apply_mask(scores: Tensor, kind: str, mask: Tensor | None) -> Tensor:
    """Add a (row block of a) normalised mask to scores ``(B, H, rows, S_k)``."""
    if kind == "none":
        return scores
    assert mask is not None
    if kind == "keys":
        return scores.masked_fill(~mask[:, None, None, :], -math.inf)
    if kind == "bool":
        return scores.masked_fill(~mask, -math.inf)
    return scores + mask.to(scores.dtype)


# ---------------------------------------------------------------------------------------
# Reference path: exact, chunked over query rows. Computed in fp32 at least (fp64 stays
# fp64); the logsumexp of an all-masked row is +inf, so exp(S - lse) = 0 there.
# ---------------------------------------------------------------------------------------


def _rows_per_block(q: Tensor, s_k: int, chunk_size: int | None) -> int:
    """Query rows per block of the reference path."""
    if chunk_size is not None:
        return chunk_size
    per_row = max(1, q.shape[0] * q.shape[1] * s_k)
    return max(_MIN_ROWS, _BLOCK_ELEMENTS // per_row)


def _block_scores(qc: Tensor, kc: Tensor, scale: float, kind: str, mask: Tensor | None) -> Tensor:
    """Masked scores ``scale q k^T + M`` for a row block, in the compute dtype."""
    return _apply_mask(torch.matmul(qc, kc.transpose(-1, -2)) * scale, kind, mask)


def _lse(scores: Tensor) -> Tensor:
    """Row logsumexp of ``scores``, +inf for rows with no finite score."""
    lse = torch.logsumexp(scores, dim=-1)
    return torch.where(torch.isneginf(lse), math.inf, lse)


def _tangent_block(
    p: Tensor,
    o: Tensor,
    qc: Tensor,
    k: Tensor,
    v: Tensor,
    tq: Tensor | None,
    tk: Tensor | None,
    tv: Tensor | None,
    scale: float,
) -> Tensor:
    """``dO = (P * dS) V + P dV - rowsum(P * dS) O`` for one row block (compute dtype)."""
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
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tangents: tuple[Tensor | None, ...] | None,
    kind: str,
    mask: Tensor | None,
    scale: float,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Output, logsumexp and (when ``tangents`` is given) the tangent, block by block."""
    cdt = compute_dtype(q.dtype)
    k32, v32 = k.to(cdt), v.to(cdt)
    tk, tv = (
        (None, None) if tangents is None else (_cast(tangents[1], cdt), _cast(tangents[2], cdt))
    )
    s_q, rows = q.shape[2], _rows_per_block(q, k.shape[2], chunk_size)
    outs, lses, touts = [], [], []
    for start in range(0, s_q, rows):
        stop = min(start + rows, s_q)
        qc = q[:, :, start:stop].to(cdt)
        scores = _block_scores(qc, k32, scale, kind, _mask_rows(kind, mask, start, stop))
        lse = _lse(scores)
        p = torch.exp(scores - lse[..., None])
        o = torch.matmul(p, v32)
        outs.append(o.to(q.dtype))
        lses.append(lse)
        if tangents is not None:
            tqc = None if tangents[0] is None else tangents[0][:, :, start:stop].to(cdt)
            touts.append(_tangent_block(p, o, qc, k32, v32, tqc, tk, tv, scale).to(q.dtype))
    tout = torch.cat(touts, dim=2) if tangents is not None else None
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2), tout


def reference_tangent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    tq: Tensor | None,
    tk: Tensor | None,
    tv: Tensor | None,
    kind: str,
    mask: Tensor | None,
    scale: float,
    chunk_size: int | None,
) -> Tensor:
    """Tangent of the output from the saved output and logsumexp, block by block."""
    cdt = compute_dtype(q.dtype)
    k32, v32, tk32, tv32 = k.to(cdt), v.to(cdt), _cast(tk, cdt), _cast(tv, cdt)
    s_q, rows = q.shape[2], _rows_per_block(q, k.shape[2], chunk_size)
    touts = []
    for start in range(0, s_q, rows):
        stop = min(start + rows, s_q)
        qc = q[:, :, start:stop].to(cdt)
        scores = _block_scores(qc, k32, scale, kind, _mask_rows(kind, mask, start, stop))
        p = torch.exp(scores - lse[:, :, start:stop, None])
        tqc = None if tq is None else tq[:, :, start:stop].to(cdt)
        oc = o[:, :, start:stop].to(cdt)
        touts.append(_tangent_block(p, oc, qc, k32, v32, tqc, tk32, tv32, scale).to(q.dtype))
    return torch.cat(touts, dim=2)


def reference_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    grad_o: Tensor,
    kind: str,
    mask: Tensor | None,
    scale: float,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``<grad_o, O>`` with respect to q, k, v, block by block.

    ``dP = grad_o V^T``, ``dS = P * (dP - rowsum(grad_o * O))``, then
    ``grad_q = scale dS K``, ``grad_k = scale dS^T Q``, ``grad_v = P^T grad_o``.
    """
    cdt = compute_dtype(q.dtype)
    k32, v32 = k.to(cdt), v.to(cdt)
    grad_k, grad_v = torch.zeros_like(k32), torch.zeros_like(v32)
    s_q, rows = q.shape[2], _rows_per_block(q, k.shape[2], chunk_size)
    grad_qs = []
    for start in range(0, s_q, rows):
        stop = min(start + rows, s_q)
        qc, gc = q[:, :, start:stop].to(cdt), grad_o[:, :, start:stop].to(cdt)
        scores = _block_scores(qc, k32, scale, kind, _mask_rows(kind, mask, start, stop))
        p = torch.exp(scores - lse[:, :, start:stop, None])
        delta = (gc * o[:, :, start:stop].to(cdt)).sum(-1, keepdim=True)
        ds = p * (torch.matmul(gc, v32.transpose(-1, -2)) - delta) * scale
        grad_qs.append(torch.matmul(ds, k32).to(q.dtype))
        grad_k += torch.matmul(ds.transpose(-1, -2), qc)
        grad_v += torch.matmul(p.transpose(-1, -2), gc)
    return torch.cat(grad_qs, dim=2), grad_k.to(k.dtype), grad_v.to(v.dtype)
