"""Fused Triton kernel for softmax attention and its forward-mode tangent.

One program handles a block of ``BLOCK_M`` query rows of one (batch, head) and streams the
keys and values in blocks of ``BLOCK_N`` (FlashAttention, Dao et al., arXiv 2205.14135,
Alg. 1), so memory is O(S). With ``S = scale Q K^T`` (masked keys at ``-inf``) and
``P = softmax(S)`` the kernel accumulates, with the same online-softmax rescaling::

    l   = sum_j exp(S_j - m)                       (row sum)
    A   = sum_j exp(S_j - m) V_j                   (output numerator)
    g   = sum_j exp(S_j - m) dS_j                  (row sum of P * dS, unnormalised)
    T   = sum_j exp(S_j - m) (dS_j V_j + dV_j)     (tangent numerator)

with ``dS = scale (dQ K^T + Q dK^T)``, and finishes with ``O = A / l`` and
``dO = T / l - (g / l) O``. Exponentials use ``exp2`` with ``log2(e)`` folded into the
scale. Accumulators are fp32 whatever the input dtype (fp16, bf16, fp32; fp32 inputs use
IEEE fp32 dots, not TF32).

Three modes share the kernel (compile-time flags): primal only (``O`` and the natural
logsumexp ``lse``, saved for the backward), fused primal + tangent in one pass, and tangent
only, which reads a saved ``lse`` and ``O`` so ``P = exp(S - lse)`` needs no rescaling
(compiled fp32 uses the last two instead of the fused mode: see ``_fuses``). Each mode has
its own autotune tile list, chosen from compile-time register and shared-memory counts on
sm_90 (``benchmarks/kernel_resources.py``). An optional boolean key-padding mask
``(B, S_k)`` (True = attend) is supported; rows with every key masked give ``O = dO = 0``
and ``lse = +inf``. Any ``S_q``, ``S_k`` (blocks are bounds-checked; full key blocks skip
the bounds masks) and head dims up to 256 (padded to a power of two, at least 16).

The backward is in :mod:`mfcore.kernels.flash_bwd` (FlashAttention-2 style, from the saved
``lse`` and ``O``); what both share is in :mod:`mfcore.kernels.common`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mfcore.kernels.common import LOG2E, dot, interpreter_block, interpreting, tile_configs

__all__ = ["attention_forward", "attention_tangent"]

# ln 2, for the natural logsumexp of scores kept in log2 units (LOG2E).
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
# Autotune tiles (BLOCK_M, BLOCK_N, num_warps, num_stages), one list per mode. Chosen from
# compile-time resource counts for an H100 (sm_90a, Triton 3.9, bf16/fp16, S=4608), made
# without a GPU by benchmarks/kernel_resources.py (results/kernel_resources.json; no timing
# yet): at D=128 every tile below compiles without register spills and fits in shared
# memory, and each list keeps one tile that fits at D=256. The fused mode holds two fp32
# (BLOCK_M, D) accumulators plus Q and dQ, so it takes 32-64 keys per step and 64 query rows
# per warp group (255 registers at BLOCK_N=64); at D=128 its BLOCK_N=128 tiles spill
# 0.4-0.6 KB and need 292-320 KiB of shared memory, and 8 warps on 64 rows split the
# accumulators across warp groups badly (layout round trips through shared memory), so
# neither is listed. (64, 32, 4, 2) is its D=256 tile. fp32 (FMA dots) spills in nearly
# every tile whatever the list: see docs/attention.md.
_SHAPES = {
    "primal": ((128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3),
               (64, 128, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3)),
    "fused": ((128, 64, 8, 2), (128, 32, 8, 2), (128, 32, 8, 3), (64, 64, 4, 2),
              (64, 32, 4, 2), (64, 32, 4, 3)),
    "tangent": ((128, 64, 8, 2), (128, 32, 8, 2), (128, 32, 8, 3), (64, 64, 4, 2),
                (64, 64, 4, 3), (64, 32, 4, 2)),
}  # fmt: skip


@triton.jit
def _load(ptrs, mask, EVEN: tl.constexpr):
    """``tl.load`` of a tile, zero outside ``mask`` unless the tile is known to be in bounds."""
    if EVEN:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _attn_jvp_kernel(
    Q, K, V, TQ, TK, TV, O, TO, LSE, KEEP,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_tqb, s_tqh, s_tqs, s_tqd,
    s_tkb, s_tkh, s_tks, s_tkd,
    s_tvb, s_tvh, s_tvs, s_tvd,
    s_ob, s_oh, s_os, s_od,
    s_mb, s_ms,
    n_heads, seq_q, seq_k, head_dim, scale,
    PRIMAL: tl.constexpr, TANGENT: tl.constexpr,
    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols0 = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < seq_q
    dim_ok = dims < head_dim
    q_tile = row_ok[:, None] & dim_ok[None, :]

    q = tl.load(
        Q + b * s_qb + h * s_qh + rows[:, None] * s_qs + dims[None, :] * s_qd,
        mask=q_tile, other=0.0,
    )  # fmt: skip
    if TANGENT and HAS_TQ:
        tq = tl.load(
            TQ + b * s_tqb + h * s_tqh + rows[:, None] * s_tqs + dims[None, :] * s_tqd,
            mask=q_tile, other=0.0,
        )  # fmt: skip
    qk_scale = scale * LOG2E  # scores in log2 units

    if PRIMAL:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    else:
        lse = tl.load(LSE + pid_bh * seq_q + rows, mask=row_ok, other=float("inf"))
        m_i = lse * LOG2E
    if TANGENT:
        g_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Register budget: in the fused mode at D=128 the two fp32 (BLOCK_M, D) accumulators take
    # half of an H100 thread's 255 registers, so the loop body is ordered to keep few score
    # tiles live: P feeds both of its matmuls (P V, P dV) as soon as it exists, and only then
    # is dS formed and folded into P * dS (see benchmarks/kernel_resources.py).
    KV_EVEN: tl.constexpr = EVEN_N and EVEN_D  # key/value tiles need no bounds masks
    for start in range(0, seq_k, BLOCK_N):
        cols = start + cols0
        col_in = cols < seq_k
        col_ok = col_in
        if HAS_MASK:
            keep = tl.load(KEEP + b * s_mb + cols * s_ms, mask=col_in, other=0)
            col_ok = col_in & (keep != 0)
        kt_tile = dim_ok[:, None] & col_in[None, :]  # (D, N) tiles: K^T, dK^T
        kv_tile = col_in[:, None] & dim_ok[None, :]  # (N, D) tiles: V, dV
        k_t = _load(
            K + b * s_kb + h * s_kh + cols[None, :] * s_ks + dims[:, None] * s_kd, kt_tile,
            KV_EVEN,
        )  # fmt: skip
        s = dot(q, k_t, PRECISION, UPCAST) * qk_scale
        if HAS_MASK or not EVEN_N:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        if PRIMAL:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        else:
            p = tl.exp2(s - m_i[:, None])
        v = _load(
            V + b * s_vb + h * s_vh + cols[:, None] * s_vs + dims[None, :] * s_vd, kv_tile,
            KV_EVEN,
        )  # fmt: skip
        p_lo = p.to(v.dtype)
        if PRIMAL:
            acc = acc * alpha[:, None] + dot(p_lo, v, PRECISION, UPCAST)
        if TANGENT:
            if PRIMAL:
                acc_t = acc_t * alpha[:, None]
                g_i = g_i * alpha
            if HAS_TV:
                tv = _load(
                    TV + b * s_tvb + h * s_tvh + cols[:, None] * s_tvs + dims[None, :] * s_tvd,
                    kv_tile, KV_EVEN,
                )  # fmt: skip
                acc_t += dot(p_lo, tv, PRECISION, UPCAST)
            if HAS_TQ or HAS_TK:
                ds = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                if HAS_TQ:
                    ds += dot(tq, k_t, PRECISION, UPCAST)
                if HAS_TK:
                    tk_t = _load(
                        TK + b * s_tkb + h * s_tkh + cols[None, :] * s_tks
                        + dims[:, None] * s_tkd, kt_tile, KV_EVEN,
                    )  # fmt: skip
                    ds += dot(q, tk_t, PRECISION, UPCAST)
                pds = p * (ds * scale)
                g_i += tl.sum(pds, 1)
                acc_t += dot(pds.to(v.dtype), v, PRECISION, UPCAST)

    o_offs = b * s_ob + h * s_oh + rows[:, None] * s_os + dims[None, :] * s_od
    if PRIMAL:
        empty = l_i == 0.0
        l_use = tl.where(empty, 1.0, l_i)
        o = acc / l_use[:, None]
        tl.store(O + o_offs, o.to(O.dtype.element_ty), mask=q_tile)
        lse_out = tl.where(empty, float("inf"), (m_i + tl.log2(l_use)) * _LN2)
        tl.store(LSE + pid_bh * seq_q + rows, lse_out, mask=row_ok)
        if TANGENT:
            t_out = acc_t / l_use[:, None] - (g_i / l_use)[:, None] * o
            tl.store(TO + o_offs, t_out.to(TO.dtype.element_ty), mask=q_tile)
    else:
        o = tl.load(O + o_offs, mask=q_tile, other=0.0).to(tl.float32)
        t_out = acc_t - g_i[:, None] * o
        tl.store(TO + o_offs, t_out.to(TO.dtype.element_ty), mask=q_tile)


def _mode(primal: bool, tangent: bool) -> str:
    """The kernel mode's name: ``"primal"``, ``"fused"`` or ``"tangent"``."""
    if not tangent:
        return "primal"
    return "fused" if primal else "tangent"


_TUNE_KEY = ["seq_q", "seq_k", "head_dim", "HAS_TQ", "HAS_TK", "HAS_TV", "HAS_MASK"]


def _even_n(args: dict) -> bool:
    """Whether every key block is full (``S_k`` a multiple of ``BLOCK_N``): no key masks."""
    return args["seq_k"] % args["BLOCK_N"] == 0


# One autotuner per mode, each with its own tile list; EVEN_N follows from the chosen tile.
_TUNED = {
    mode: triton.autotune(configs=tile_configs(shapes), key=_TUNE_KEY)(
        triton.heuristics({"EVEN_N": _even_n})(_attn_jvp_kernel)
    )
    for mode, shapes in _SHAPES.items()
}


def _fuses(dtype: torch.dtype) -> bool:
    """Whether primal and tangent run as one fused pass for inputs of ``dtype``.

    Not for compiled fp32: Triton 3.9's LLVM SLP vectorizer aborts the process (an assertion,
    not an exception) while compiling the fused mode's IEEE fp32 dots for many tiles (every
    BLOCK_N=32 tile at D=64 and D=128, BLOCK_N=64 at D=32; benchmarks/kernel_resources.py),
    while the primal and tangent modes compile. fp32 then takes the forward kernel and the
    tangent kernel from its ``lse`` (seven matmuls instead of six, same result).
    """
    return dtype != torch.float32 or interpreting()


def _strides(x: Tensor | None, like: Tensor) -> tuple[int, ...]:
    return tuple((like if x is None else x).stride())


def _kernel_inputs(
    qkv: tuple[Tensor, Tensor, Tensor], tangents: tuple[Tensor | None, ...],
    outputs: tuple[Tensor, Tensor | None, Tensor], *, key_mask: Tensor | None, scale: float,
    primal: bool,
) -> tuple[tuple, dict]:  # fmt: skip
    """The kernel's positional arguments and compile-time flags (all but the tile sizes and
    ``EVEN_N``, which depend on the tile; see :func:`_even_n`). ``outputs`` is
    ``(O, dO or None, lse)``.

    Also used by ``benchmarks/kernel_resources.py`` to compile the kernel ahead of time
    with exactly the arguments (and so the specialisation) a real launch has.
    """
    q, k, v = qkv
    o, t_out, lse = outputs
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    tq, tk, tv = tangents
    tangent = t_out is not None
    keep = key_mask.to(torch.int8) if key_mask is not None else lse
    mask_strides = (keep.stride(0), keep.stride(1)) if key_mask is not None else (0, 0)
    args = (
        q, k, v, tq if tq is not None else q, tk if tk is not None else k,
        tv if tv is not None else v, o, t_out if tangent else o, lse, keep,
        *q.stride(), *k.stride(), *v.stride(), *_strides(tq, q), *_strides(tk, k),
        *_strides(tv, v), *o.stride(), *mask_strides, heads, seq_q, seq_k, head_dim, scale,
    )  # fmt: skip
    block_d = max(16, triton.next_power_of_2(head_dim))
    flags = dict(
        PRIMAL=primal, TANGENT=tangent, HAS_TQ=tq is not None, HAS_TK=tk is not None,
        HAS_TV=tv is not None, HAS_MASK=key_mask is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_D=block_d, EVEN_D=head_dim == block_d,
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
    )  # fmt: skip
    return args, flags


def _launch(
    qkv: tuple[Tensor, Tensor, Tensor], tangents: tuple[Tensor | None, ...],
    outputs: tuple[Tensor, Tensor | None, Tensor], *, key_mask: Tensor | None, scale: float,
    primal: bool,
) -> None:  # fmt: skip
    """Launch the kernel; ``O``/``lse`` of ``outputs`` are outputs when ``primal``, inputs
    otherwise."""
    args, flags = _kernel_inputs(
        qkv, tangents, outputs, key_mask=key_mask, scale=scale, primal=primal
    )
    batch, heads, seq_q, _ = qkv[0].shape
    seq_k = qkv[1].shape[2]
    if interpreting():
        block = interpreter_block(seq_q, seq_k)
        grid = (triton.cdiv(seq_q, block), batch * heads)
        even_n = seq_k % block == 0
        _attn_jvp_kernel[grid](*args, **flags, BLOCK_M=block, BLOCK_N=block, EVEN_N=even_n)
    else:

        def grid(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads)

        _TUNED[_mode(primal, outputs[1] is not None)][grid](*args, **flags)


def _check_tangent(name: str, t: Tensor | None, ref: Tensor) -> Tensor | None:
    if t is not None and (t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device):
        raise ValueError(
            f"{name} must match its primal ({tuple(ref.shape)}, {ref.dtype}, {ref.device}), "
            f"got ({tuple(t.shape)}, {t.dtype}, {t.device})"
        )
    return t


def attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tangents: tuple[Tensor | None, Tensor | None, Tensor | None] | None = None,
    *,
    key_mask: Tensor | None = None,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Attention output, logsumexp and (optionally) the tangent, in one pass (two for
    compiled fp32 inputs, see :func:`_fuses`).

    Args:
        q: queries ``(B, H, S_q, D)``, fp16/bf16/fp32, any strides.
        k: keys ``(B, H, S_k, D)``.
        v: values ``(B, H, S_k, D)``.
        tangents: ``(dq, dk, dv)`` shaped like ``q, k, v`` (entries may be None = zero),
            or None for the primal only.
        key_mask: boolean ``(B, S_k)``, True = attend.
        scale: score scale.

    Returns:
        ``O (B, H, S_q, D)`` in the input dtype, the natural logsumexp ``(B, H, S_q)`` in
        fp32 (+inf on all-masked rows), and the tangent ``dO`` (or None).
    """
    tangents = tangents if tangents is not None else (None, None, None)
    for name, t, ref in zip(("dq", "dk", "dv"), tangents, (q, k, v), strict=True):
        _check_tangent(name, t, ref)
    batch, heads, seq_q, _ = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    wants_tangent = any(t is not None for t in tangents)
    t_out = torch.empty_like(o) if wants_tangent else None
    options = {"key_mask": key_mask, "scale": scale}
    if wants_tangent and not _fuses(q.dtype):  # two passes: primal, then tangent from lse
        _launch((q, k, v), (None,) * 3, (o, None, lse), primal=True, **options)
        _launch((q, k, v), tangents, (o, t_out, lse), primal=False, **options)
    else:
        _launch((q, k, v), tangents, (o, t_out, lse), primal=True, **options)
    return o, lse, t_out


def attention_tangent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    tangents: tuple[Tensor | None, Tensor | None, Tensor | None],
    *,
    key_mask: Tensor | None = None,
    scale: float,
) -> Tensor:
    """Tangent ``dO`` from a saved output and logsumexp (one pass, no rescaling).

    Args:
        q, k, v: as in :func:`attention_forward`.
        o: the output ``(B, H, S_q, D)`` of :func:`attention_forward`.
        lse: its logsumexp ``(B, H, S_q)``, fp32.
        tangents: ``(dq, dk, dv)``, entries may be None (zero).
        key_mask: boolean ``(B, S_k)``, True = attend.
        scale: score scale.

    Returns:
        ``dO = (P * dS) V + P dV - rowsum(P * dS) O``, ``(B, H, S_q, D)``, input dtype.
    """
    for name, t, ref in zip(("dq", "dk", "dv"), tangents, (q, k, v), strict=True):
        _check_tangent(name, t, ref)
    o, lse = o.contiguous(), lse.contiguous()
    t_out = torch.empty(o.shape, dtype=q.dtype, device=q.device)
    if all(t is None for t in tangents):
        return t_out.zero_()
    outputs = (o, t_out, lse)
    _launch((q, k, v), tangents, outputs, key_mask=key_mask, scale=scale, primal=False)
    return t_out
