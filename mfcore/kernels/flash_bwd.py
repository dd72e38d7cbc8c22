"""Fused Triton backward of softmax attention from the saved logsumexp.

Reverse mode through ``O = softmax(S) V`` with ``S = scale Q K^T`` (masked keys at
``-inf``), given the output ``O``, the natural logsumexp ``lse`` saved by
:func:`mfcore.kernels.flash_jvp.attention_forward` and the output gradient ``G = dL/dO``
(FlashAttention-2, Dao, arXiv 2307.08691, Alg. 2)::

    P     = exp(S - lse)                      (exact, block by block: no rescaling)
    delta = rowsum(G * O)                     (= rowsum(P * dP), one number per query row)
    dP    = G V^T
    dS    = P * (dP - delta)                  (softmax backward, row by row)
    dV    = P^T G,   dK = scale dS^T Q,   dQ = scale dS K

Three kernels, none with atomics, so the score matrix is never stored:

1. ``delta`` (fp32, ``(B, H, S_q)``) from ``G`` and ``O``;
2. one program per block of ``BLOCK_N`` keys of one (batch, head) streams the query
   blocks and accumulates ``dK`` and ``dV`` for its keys;
3. one program per block of ``BLOCK_M`` queries streams the key blocks and accumulates
   ``dQ``.

Kernels 2 and 3 both recompute ``S``, ``P`` and ``dP`` (seven matmuls per tile pair in all,
against five for a single kernel with atomic ``dQ`` updates), the price of deterministic,
atomic-free gradients. Exponentials use ``exp2`` with ``log2(e)`` folded into the scale, as
in the forward. Accumulators are fp32 whatever the input dtype (fp16, bf16, fp32; fp32
inputs use IEEE fp32 dots, not TF32); ``P`` and ``dS`` are rounded to the input dtype for
their matmuls, as in the forward. An optional boolean key-padding mask ``(B, S_k)``
(True = attend) zeroes ``P`` on masked keys; rows with every key masked have
``lse = +inf``, so ``P = 0`` and their gradients are exactly zero. Any ``S_q``, ``S_k``
(blocks are bounds-checked) and head dims up to 256 (padded to a power of two, at least 16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mfcore.kernels.common import LOG2E, dot, interpreter_block, interpreting, tile_configs

__all__ = ["attention_backward"]

# Tile shapes (BLOCK_M, BLOCK_N, num_warps, num_stages). The dK/dV kernel keeps two
# (BLOCK_N, D) accumulators and the K, V tiles resident, so it streams short query blocks;
# the dQ kernel keeps one accumulator and Q, G resident. From compile-time resource counts
# for sm_90 (benchmarks/kernel_resources.py, results/kernel_resources.json; no GPU run yet):
# at D=128 in bf16/fp16 every tile compiles without spills except the dK/dV (64, 64, 4, 2)
# tile (8 bytes); (32, 128, 8, 3) replaced (64, 128, 8, 2), which spilled 68 bytes. In fp32
# (IEEE dots are FMA loops) only the 8-warp (16, 64) dK/dV and (32, 64) dQ tiles are
# spill-free, so they stay in the lists.
_DKDV_SHAPES = ((16, 64, 4, 2), (32, 64, 4, 2), (32, 64, 4, 3), (64, 64, 4, 2),
                (16, 64, 8, 2), (32, 128, 8, 2), (32, 128, 8, 3))  # fmt: skip
_DQ_SHAPES = ((32, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3),
              (32, 64, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3))  # fmt: skip
_DELTA_ROWS = 64  # query rows per program of the delta kernel
_TUNE_KEY = ["seq_q", "seq_k", "head_dim", "HAS_MASK"]


@triton.jit
def _delta_kernel(
    O, G, DELTA,
    s_ob, s_oh, s_os, s_od,
    s_gb, s_gh, s_gs, s_gd,
    n_heads, seq_q, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``delta = rowsum(G * O)`` in fp32 for one block of query rows."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < seq_q
    tile = row_ok[:, None] & (dims < head_dim)[None, :]
    o = tl.load(
        O + b * s_ob + h * s_oh + rows[:, None] * s_os + dims[None, :] * s_od,
        mask=tile, other=0.0,
    ).to(tl.float32)  # fmt: skip
    g = tl.load(
        G + b * s_gb + h * s_gh + rows[:, None] * s_gs + dims[None, :] * s_gd,
        mask=tile, other=0.0,
    ).to(tl.float32)  # fmt: skip
    tl.store(DELTA + pid_bh * seq_q + rows, tl.sum(o * g, 1), mask=row_ok)


@triton.jit
def _dkdv_kernel(
    Q, K, V, G, LSE, DELTA, KEEP, DK, DV,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_gb, s_gh, s_gs, s_gd,
    s_mb, s_ms,
    n_heads, seq_q, seq_k, head_dim, scale,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``dK = scale sum_i dS_i^T Q_i`` and ``dV = sum_i P_i^T G_i`` for one key block.

    Works on transposed score tiles ``S^T`` of shape ``(BLOCK_N, BLOCK_M)`` so both
    accumulators are rows of keys. ``DK``/``DV`` are contiguous ``(B, H, S_k, D)``.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows0 = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    col_in = cols < seq_k
    dim_ok = dims < head_dim
    col_ok = col_in
    if HAS_MASK:
        keep = tl.load(KEEP + b * s_mb + cols * s_ms, mask=col_in, other=0)
        col_ok = col_in & (keep != 0)
    kv_tile = col_in[:, None] & dim_ok[None, :]
    k = tl.load(
        K + b * s_kb + h * s_kh + cols[:, None] * s_ks + dims[None, :] * s_kd,
        mask=kv_tile, other=0.0,
    )  # fmt: skip
    v = tl.load(
        V + b * s_vb + h * s_vh + cols[:, None] * s_vs + dims[None, :] * s_vd,
        mask=kv_tile, other=0.0,
    )  # fmt: skip
    qk_scale = scale * LOG2E  # scores in log2 units
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for start in range(0, seq_q, BLOCK_M):
        rows = start + rows0
        row_ok = rows < seq_q
        q_tile = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(
            Q + b * s_qb + h * s_qh + rows[:, None] * s_qs + dims[None, :] * s_qd,
            mask=q_tile, other=0.0,
        )  # fmt: skip
        g = tl.load(
            G + b * s_gb + h * s_gh + rows[:, None] * s_gs + dims[None, :] * s_gd,
            mask=q_tile, other=0.0,
        )  # fmt: skip
        # Rows past S_q read lse = +inf: P = 0 there, like rows with every key masked.
        lse = tl.load(LSE + pid_bh * seq_q + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * seq_q + rows, mask=row_ok, other=0.0)
        s_t = dot(k, tl.trans(q), PRECISION, UPCAST) * qk_scale
        p_t = tl.exp2(s_t - (lse * LOG2E)[None, :])
        p_t = tl.where(col_ok[:, None], p_t, 0.0)
        dv += dot(p_t.to(g.dtype), g, PRECISION, UPCAST)
        dp_t = dot(v, tl.trans(g), PRECISION, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += dot(ds_t.to(q.dtype), q, PRECISION, UPCAST)

    out = pid_bh * seq_k * head_dim + cols[:, None] * head_dim + dims[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kv_tile)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_tile)


@triton.jit
def _dq_kernel(
    Q, K, V, G, LSE, DELTA, KEEP, DQ,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    s_vb, s_vh, s_vs, s_vd,
    s_gb, s_gh, s_gs, s_gd,
    s_mb, s_ms,
    n_heads, seq_q, seq_k, head_dim, scale,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``dQ = scale sum_j dS_j K_j`` for one query block; ``DQ`` is contiguous (B, H, S_q, D)."""
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
    g = tl.load(
        G + b * s_gb + h * s_gh + rows[:, None] * s_gs + dims[None, :] * s_gd,
        mask=q_tile, other=0.0,
    )  # fmt: skip
    lse2 = tl.load(LSE + pid_bh * seq_q + rows, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + pid_bh * seq_q + rows, mask=row_ok, other=0.0)
    qk_scale = scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start in range(0, seq_k, BLOCK_N):
        cols = start + cols0
        col_in = cols < seq_k
        col_ok = col_in
        if HAS_MASK:
            keep = tl.load(KEEP + b * s_mb + cols * s_ms, mask=col_in, other=0)
            col_ok = col_in & (keep != 0)
        k = tl.load(
            K + b * s_kb + h * s_kh + cols[:, None] * s_ks + dims[None, :] * s_kd,
            mask=col_in[:, None] & dim_ok[None, :], other=0.0,
        )  # fmt: skip
        v_t = tl.load(
            V + b * s_vb + h * s_vh + cols[None, :] * s_vs + dims[:, None] * s_vd,
            mask=dim_ok[:, None] & col_in[None, :], other=0.0,
        )  # fmt: skip
        s = dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(col_ok[None, :], p, 0.0)
        dp = dot(g, v_t, PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(k.dtype), k, PRECISION, UPCAST)

    out = pid_bh * seq_q * head_dim + rows[:, None] * head_dim + dims[None, :]
    tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty), mask=q_tile)


_tuned_dkdv = triton.autotune(configs=tile_configs(_DKDV_SHAPES), key=_TUNE_KEY)(_dkdv_kernel)
_tuned_dq = triton.autotune(configs=tile_configs(_DQ_SHAPES), key=_TUNE_KEY)(_dq_kernel)


def _check_inputs(saved: tuple[Tensor, ...], grad_o: Tensor) -> None:
    """Raise ``ValueError`` unless ``saved = (q, k, v, o, lse)`` and ``grad_o`` form one
    attention call's saved state."""
    q, k, v, o, lse = saved
    if q.ndim != 4 or k.ndim != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"q (B, H, S_q, D) and k (B, H, S_k, D) do not match: {tuple(q.shape)}, "
            f"{tuple(k.shape)}"
        )
    for name, x, ref, ref_name in (("v", v, k, "k"), ("o", o, q, "q"), ("grad_o", grad_o, q, "q")):
        if x.shape != ref.shape or x.dtype != ref.dtype or x.device != ref.device:
            raise ValueError(
                f"{name} must match {ref_name} ({tuple(ref.shape)}, {ref.dtype}, {ref.device}), "
                f"got ({tuple(x.shape)}, {x.dtype}, {x.device})"
            )
    if lse.shape != q.shape[:3] or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(
            f"lse must be float32 of shape (B, H, S_q) = {tuple(q.shape[:3])} on {q.device}, "
            f"got ({tuple(lse.shape)}, {lse.dtype}, {lse.device})"
        )


def _check_key_mask(key_mask: Tensor | None, q: Tensor, k: Tensor) -> None:
    if key_mask is None:
        return
    want = (q.shape[0], k.shape[2])
    if key_mask.dtype != torch.bool or tuple(key_mask.shape) != want:
        raise ValueError(
            f"key_mask must be boolean of shape (B, S_k) = {want}, "
            f"got ({tuple(key_mask.shape)}, {key_mask.dtype})"
        )
    if key_mask.device != q.device:
        raise ValueError(f"key_mask is on {key_mask.device} but q is on {q.device}")


def attention_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    grad_o: Tensor,
    *,
    key_mask: Tensor | None = None,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``<grad_o, O>`` with respect to ``q``, ``k``, ``v``.

    ``dV = P^T G``, ``dS = P * (G V^T - rowsum(G * O))``, ``dQ = scale dS K``,
    ``dK = scale dS^T Q`` with ``P = exp(scale Q K^T - lse)`` recomputed block by block
    (FlashAttention-2, arXiv 2307.08691, Alg. 2; see the module docstring).

    Args:
        q: queries ``(B, H, S_q, D)``, fp16/bf16/fp32, any strides.
        k: keys ``(B, H, S_k, D)``.
        v: values ``(B, H, S_k, D)``.
        o: the output ``(B, H, S_q, D)`` of
            :func:`mfcore.kernels.flash_jvp.attention_forward`.
        lse: its natural logsumexp ``(B, H, S_q)``, fp32, ``+inf`` on all-masked rows.
        grad_o: the gradient of the loss with respect to ``o``, ``(B, H, S_q, D)``, any
            strides (zero strides from an expanded gradient included).
        key_mask: boolean ``(B, S_k)``, True = attend; the mask of the forward call.
        scale: the score scale of the forward call.

    Returns:
        ``(grad_q, grad_k, grad_v)``, contiguous and shaped like ``q, k, v``, in the input
        dtype. Rows and keys that take no part in the softmax get exact zeros.

    Raises:
        ValueError: shapes, dtypes or devices that do not fit one forward call.
    """
    _check_inputs((q, k, v, o, lse), grad_o)
    _check_key_mask(key_mask, q, k)
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    grad_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    grad_v = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    block_d = max(16, triton.next_power_of_2(head_dim))

    _delta_kernel[(triton.cdiv(seq_q, _DELTA_ROWS), batch * heads)](
        o, grad_o, delta, *o.stride(), *grad_o.stride(), heads, seq_q, head_dim,
        BLOCK_M=_DELTA_ROWS, BLOCK_D=block_d,
    )  # fmt: skip

    keep = key_mask.to(torch.int8) if key_mask is not None else lse
    mask_strides = (keep.stride(0), keep.stride(1)) if key_mask is not None else (0, 0)
    inputs = (q, k, v, grad_o, lse, delta, keep)
    sizes = (
        *q.stride(), *k.stride(), *v.stride(), *grad_o.stride(), *mask_strides,
        heads, seq_q, seq_k, head_dim, scale,
    )  # fmt: skip
    dkdv_args = (*inputs, grad_k, grad_v, *sizes)
    dq_args = (*inputs, grad_q, *sizes)
    flags = dict(
        HAS_MASK=key_mask is not None, BLOCK_D=block_d,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
    )  # fmt: skip
    if interpreting():
        block = interpreter_block(seq_q, seq_k)
        tiles = dict(BLOCK_M=block, BLOCK_N=block)
        _dkdv_kernel[(triton.cdiv(seq_k, block), batch * heads)](*dkdv_args, **flags, **tiles)
        _dq_kernel[(triton.cdiv(seq_q, block), batch * heads)](*dq_args, **flags, **tiles)
    else:

        def grid_k(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(seq_k, meta["BLOCK_N"]), batch * heads)

        def grid_q(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads)

        _tuned_dkdv[grid_k](*dkdv_args, **flags)
        _tuned_dq[grid_q](*dq_args, **flags)
    return grad_q, grad_k, grad_v
