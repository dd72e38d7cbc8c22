"""Scaled dot-product attention that forward-mode AD can differentiate.

Every fused attention kernel in torch (flash, memory-efficient, cuDNN) raises
``NotImplementedError`` under forward-mode AD, and the math backend materialises the
``S_q x S_k`` score matrix. MeanFlow (Geng et al., arXiv 2505.13447, eq. 8) needs the JVP
``du/dt`` of a transformer, so it needs attention with a tangent rule. :func:`attention` is
a drop-in for :func:`torch.nn.functional.scaled_dot_product_attention` (same layout
``(B, H, S, D)``) implemented as an ``autograd.Function`` with ``jvp`` and ``backward``:

- ``backend="triton"``: fused Triton kernels with an online softmax, O(S) memory: primal
  and tangent in :mod:`mfcore.kernels.flash_jvp`, the backward from the saved logsumexp in
  :mod:`mfcore.kernels.flash_bwd`; CUDA, or CPU under ``TRITON_INTERPRET=1`` (tests).
- ``backend="reference"``: exact torch code chunked over query blocks, O(S x block) memory,
  any device and dtype (fp64 for tests).
- ``backend="auto"``: Triton on CUDA when the call is supported, else the reference.

With ``O = softmax(S) V``, ``S = scale Q K^T + M`` and ``P = softmax(S)`` the tangent is
(derivation in docs/attention.md)::

    dS = scale (dQ K^T + Q dK^T)
    dO = (P * dS) V + P dV - rowsum(P * dS) * O

and the backward (``G = dL/dO``, ``delta = rowsum(G * O)``)::

    dS = P * (G V^T - delta)
    dQ = scale dS K,   dK = scale dS^T Q,   dV = P^T G

A backward asked to build a graph (``create_graph=True``, or functorch's ``grad``/``vjp``,
which run it with grad mode on) differentiates the chunked reference instead, so double
backward is exact on both paths. Rows whose keys are all masked out return zeros (value,
tangent and gradients), never NaN (torch's SDPA returns NaN there).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack
from torch.autograd import forward_ad as fwAD

from mfcore._checks import check_choice, check_positive_int, check_same_device, check_tensor
from mfcore.attention_reference import (
    ScoreSpec,
    reference_backward,
    reference_forward,
    reference_tangent,
)
from mfcore.tangent_rules import check_once_differentiable, save_values

__all__ = ["ATTENTION_BACKENDS", "attention", "triton_available", "use_jvp_attention"]

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "triton", "reference")

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MAX_HEAD_DIM = 256
# Compute the output and its tangent in one pass when the tangents are visible at the call
# (tests switch this off to exercise the tangent-from-logsumexp rule of ``jvp``).
_FUSE_DUAL = True


# ---------------------------------------------------------------------------------------
# Masks: normalised to (kind, tensor) with kind in {"none", "keys", "bool", "float"}.
# "keys" is a (B, S_k) boolean key-padding mask; "bool"/"float" are 4-D and broadcast to
# (B, H, S_q, S_k) (True = keep; float masks are added to the scores).
# ---------------------------------------------------------------------------------------


def _normalize_mask(mask: object, q: Tensor, k: Tensor) -> tuple[str, Tensor | None]:
    """Check ``attn_mask`` and return its kind and the tensor to use."""
    if mask is None:
        return "none", None
    if not isinstance(mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"attn_mask must be boolean or floating point, got {mask.dtype}")
    check_same_device("attn_mask", mask, q, "q")
    if mask.requires_grad:
        raise ValueError("attn_mask must not require grad: it is treated as a constant")
    batch, heads, s_q = q.shape[:3]
    s_k = k.shape[2]
    if mask.ndim == 2:
        if tuple(mask.shape) != (batch, s_k):
            raise ValueError(
                f"a 2-D attn_mask is a key-padding mask of shape (B, S_k) = {(batch, s_k)}, "
                f"got {tuple(mask.shape)}"
            )
        if mask.dtype == torch.bool:
            return "keys", mask
        mask = mask[:, None, None, :]
    elif mask.ndim != 4:
        raise ValueError(
            "attn_mask must be a (B, S_k) key-padding mask or a 4-D mask broadcastable to "
            f"(B, H, S_q, S_k) = {(batch, heads, s_q, s_k)}, got shape {tuple(mask.shape)}"
        )
    for got, want, name in zip(mask.shape, (batch, heads, s_q, s_k), "BHQK", strict=True):
        if got not in (1, want):
            raise ValueError(
                f"attn_mask of shape {tuple(mask.shape)} does not broadcast to (B, H, S_q, S_k) "
                f"= {(batch, heads, s_q, s_k)} (dimension {name})"
            )
    if mask.dtype == torch.bool:
        if mask.shape[1] == 1 and mask.shape[2] == 1:
            return "keys", mask[:, 0, 0, :].expand(batch, s_k)
        return "bool", mask
    if torch.isnan(mask).any() or torch.isposinf(mask).any():
        raise ValueError("attn_mask (additive) must not contain NaN or +inf")
    return "float", mask


# ---------------------------------------------------------------------------------------
# Path selection
# ---------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def triton_available(device: torch.device | str = "cuda") -> tuple[bool, str]:
    """Whether the Triton path can run on ``device``, and why not when it cannot.

    Args:
        device: the device the tensors live on.

    Returns:
        ``(ok, reason)``; ``reason`` is empty when ``ok``.
    """
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed (pip install 'mfcore[kernels]')"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and _interpreting():
        return True, ""
    return False, (
        f"the Triton kernel needs a CUDA device, or TRITON_INTERPRET=1 (set before triton is "
        f"imported) on CPU; got device {device}"
    )


def _triton_unsupported(q: Tensor, v: Tensor, kind: str) -> str:
    """Why the Triton kernel cannot take this call (empty string when it can)."""
    ok, reason = triton_available(q.device)
    if not ok:
        return reason
    if q.dtype not in _TRITON_DTYPES:
        return f"the Triton kernel takes float16, bfloat16 or float32, got {q.dtype}"
    if kind not in ("none", "keys"):
        return (
            "the Triton kernel takes only a boolean key-padding mask ((B, S_k), or "
            f"(B, 1, 1, S_k)); got a {kind} mask broadcast to (B, H, S_q, S_k)"
        )
    if v.shape[-1] != q.shape[-1]:
        return (
            f"the Triton kernel needs equal head dims for q and v, got {q.shape[-1]}, {v.shape[-1]}"
        )
    if q.shape[-1] > _TRITON_MAX_HEAD_DIM:
        return f"the Triton kernel takes head dims up to {_TRITON_MAX_HEAD_DIM}, got {q.shape[-1]}"
    return ""


def _select_path(backend: str, q: Tensor, v: Tensor, kind: str) -> str:
    """Resolve ``backend`` to ``"triton"`` or ``"reference"`` (raising when unavailable)."""
    if backend == "reference":
        return "reference"
    reason = _triton_unsupported(q, v, kind)
    if backend == "triton":
        if reason:
            raise RuntimeError(f"backend='triton' is unavailable: {reason}")
        return "triton"
    if q.device.type == "cuda" and not reason:
        return "triton"
    return "reference"


# ---------------------------------------------------------------------------------------
# The autograd.Function
# ---------------------------------------------------------------------------------------


def _path_forward(path: str, qkv, tangents, spec: ScoreSpec):
    if path == "triton":
        from mfcore.kernels import flash_jvp

        return flash_jvp.attention_forward(*qkv, tangents, key_mask=spec.key_mask, scale=spec.scale)
    return reference_forward(*qkv, tangents, spec)


def _raw(x: Tensor | None) -> Tensor | None:
    """Peel the functorch wrappers ``torch.func.jvp`` puts on the tensors a ``jvp`` rule sees.

    A Triton kernel needs plain storage; the plain tangent it returns is lifted back by
    functorch. Batched (vmap) tensors cannot be peeled without changing their shape.
    """
    functorch = torch._C._functorch
    while x is not None and functorch.is_functorch_wrapped_tensor(x):
        if functorch.is_batchedtensor(x):
            raise RuntimeError("attention: the Triton path does not support vmap")
        x = functorch.get_unwrapped(x)
    return x


def _path_tangent(path: str, saved, tangents, spec: ScoreSpec):
    if path == "triton":
        from mfcore.kernels import flash_jvp

        saved, tangents = tuple(map(_raw, saved)), tuple(map(_raw, tangents))
        with temporarily_clear_interpreter_stack():  # plain tensors for the kernel's buffers
            return flash_jvp.attention_tangent(
                *saved, tangents, key_mask=spec.key_mask, scale=spec.scale
            )
    return reference_tangent(saved, tangents, spec)


def _path_backward(path: str, saved, grad_o, spec: ScoreSpec):
    """Gradients of ``<grad_o, O>`` (no graph): the Triton kernel on the Triton path.

    Only reached with grad mode off. functorch transforms (``torch.func.grad``, ``vjp``)
    run the backward with grad mode on, so their wrapped tensors take the differentiable
    branch; should a wrapped tensor still arrive here, the reference (plain torch ops,
    which functorch traces) keeps what the wrapper carries instead of peeling it off.
    """
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if path == "triton" and not any(wrapped(x) for x in (*saved, grad_o)):
        from mfcore.kernels import flash_bwd

        return flash_bwd.attention_backward(
            *saved, grad_o, key_mask=spec.key_mask, scale=spec.scale
        )
    return reference_backward(saved, grad_o, spec)


class _AttentionFunction(torch.autograd.Function):
    """``O = softmax(scale Q K^T + M) V`` with a tangent rule and a primal backward.

    Inputs ``(q, k, v, tq, tk, tv, mask, spec, path)``; the mask travels as an input of its
    own (not inside ``spec``) so that functorch transforms unwrap it with the others. When
    the forward tangents ``tq, tk, tv`` are passed (the fused dual call, see
    :func:`_dual_tangents`), the forward computes the output and its tangent in one pass and
    ``jvp`` hands the stored tangent on; otherwise ``jvp`` recomputes the scores from the
    saved logsumexp. Only ``q, k, v, O, lse`` are saved: the tangent is never kept for the
    backward, which recomputes ``P`` from ``lse`` (Triton kernel or chunked reference, by
    ``path``).
    """

    @staticmethod
    def forward(q, k, v, tq, tk, tv, mask, spec, path):
        tangents = None if tq is None and tk is None and tv is None else (tq, tk, tv)
        return _path_forward(path, (q, k, v), tangents, replace(spec, mask=mask))

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, _, _, _, mask, spec, path = inputs
        o, lse, t_out = output
        ctx.set_materialize_grads(False)  # absent tangents (of tq, tk, tv) stay None
        saved = (q, k, v, o, lse)
        save_values(ctx, *saved)  # without the tangents (they are not needed)
        ctx.save_for_forward(*saved)
        ctx.mark_non_differentiable(*(x for x in (lse, t_out) if x is not None))
        ctx.fused_tangent = t_out
        ctx.spec, ctx.path = replace(spec, mask=mask), path

    @staticmethod
    def jvp(ctx, dq, dk, dv, *_):
        fused, ctx.fused_tangent = ctx.fused_tangent, None
        if fused is not None:
            return fused, None, None
        saved = ctx.saved_tensors
        if dq is None and dk is None and dv is None:
            return torch.zeros_like(saved[3]), None, None
        return _path_tangent(ctx.path, saved, (dq, dk, dv), ctx.spec), None, None

    @staticmethod
    def backward(ctx, grad_o, *_):
        ctx.fused_tangent = None
        if grad_o is None:  # no gradient reached the output
            return (None,) * 9
        saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
            check_once_differentiable(ctx)
            grads = _differentiable_backward(saved[:3], grad_o, ctx.spec)
        else:
            grads = _path_backward(ctx.path, saved, grad_o, ctx.spec)
        return (*grads, *([None] * 6))


def _differentiable_backward(qkv, grad_o, spec: ScoreSpec):
    """Gradients that autograd can differentiate again (double backward, e.g. the
    ``"autograd"`` JVP backend): recompute the chunked reference forward with recorded ops
    and differentiate it with ``create_graph=True``. Costs an extra forward; only taken
    when a backward is asked to build a graph."""
    needs = [x.requires_grad for x in qkv]
    if not any(needs):
        return None, None, None
    o, _, _ = reference_forward(*qkv, None, spec)
    inputs = [x for x, need in zip(qkv, needs, strict=True) if need]
    found = iter(torch.autograd.grad(o, inputs, grad_o, create_graph=True))
    return tuple(next(found) if need else None for need in needs)


def _dual_tangents(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor | None, ...] | None:
    """The forward-AD tangents of q, k, v when the fused one-pass call is safe, else None.

    Safe means exactly one forward-AD level: either :mod:`torch.autograd.forward_ad` with no
    functorch transform active, or a single :func:`torch.func.jvp` and nothing else (no
    vmap, grad or nested jvp, whose tangents would belong to other levels).
    """
    if not _FUSE_DUAL or not torch._C._is_fwd_grad_enabled():
        return None
    stack = torch._C._functorch.get_interpreter_stack()
    if stack:
        if len(stack) != 1 or stack[0].key() != torch._C._functorch.TransformType.Jvp:
            return None
    elif fwAD._current_level < 0:
        return None
    tangents = tuple(fwAD.unpack_dual(x).tangent for x in (q, k, v))
    return None if all(t is None for t in tangents) else tangents


def _check_qkv(q: object, k: object, v: object) -> tuple[Tensor, Tensor, Tensor]:
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x)
        assert isinstance(x, Tensor)
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape (B, H, S, D), got {tuple(x.shape)}")
    assert isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}")
        check_same_device(name, x, q, "q")
        if x.shape[:2] != q.shape[:2]:
            raise ValueError(
                f"{name} must have the batch and head sizes of q {tuple(q.shape[:2])}, "
                f"got {tuple(x.shape)}"
            )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have the head dim of q ({q.shape[-1]}), got {tuple(k.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have the length of k ({k.shape[2]}), got {tuple(v.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if 0 in x.shape:
            raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return q, k, v


def _check_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


@torch.compiler.disable
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    """Softmax attention with forward-mode (JVP) and reverse-mode derivatives.

    ``O = softmax(scale Q K^T + M) V`` (Vaswani et al., arXiv 1706.03762, eq. 1), the
    function of :func:`torch.nn.functional.scaled_dot_product_attention` without dropout
    or causal masking, differentiable by ``backward``, by :func:`torch.func.jvp` and
    :mod:`torch.autograd.forward_ad`, and by both at once (``u, du = jvp(model, ...)`` then
    ``u.backward()``, as MeanFlow, arXiv 2505.13447, eq. 8, needs). Under a single
    forward-AD level the output and its tangent come from one fused pass; the tangent
    itself is not differentiable in reverse mode (MeanFlow detaches it). The op is kept out
    of ``torch.compile`` graphs (compile drops custom JVP rules); ``vmap`` is not supported.

    Args:
        q: queries ``(B, H, S_q, D)``.
        k: keys ``(B, H, S_k, D)``, same dtype and device as ``q``.
        v: values ``(B, H, S_k, D_v)``.
        attn_mask: None; a boolean key-padding mask ``(B, S_k)`` (True = attend); or a
            4-D boolean (True = attend) or additive float mask broadcastable to
            ``(B, H, S_q, S_k)``. A float ``(B, S_k)`` mask is an additive key mask. The
            Triton path takes only key-padding masks (``(B, S_k)`` or ``(B, 1, 1, S_k)``
            boolean). Rows with every key masked give zeros.
        scale: score scale; ``1 / sqrt(D)`` when None.
        backend: ``"auto"`` (Triton on CUDA when supported, else reference), ``"triton"``
            (raises ``RuntimeError`` when unavailable or unsupported) or ``"reference"``.
        chunk_size: query rows per block of the reference path (its memory is
            ``O(B H chunk_size S_k)``); chosen automatically when None.

    Returns:
        ``(B, H, S_q, D_v)`` in the dtype of ``q``.

    Raises:
        TypeError, ValueError: bad shapes, dtypes, devices, masks or options.
        RuntimeError: ``backend="triton"`` where the kernel cannot run.
    """
    q, k, v = _check_qkv(q, k, v)
    check_choice("backend", backend, ATTENTION_BACKENDS)
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    scale_f = _check_scale(scale, q.shape[-1])
    kind, mask = _normalize_mask(attn_mask, q, k)
    spec = ScoreSpec(kind, None, scale_f, chunk_size)
    path = _select_path(backend, q, v, kind)
    tq, tk, tv = _dual_tangents(q, k, v) or (None, None, None)
    o, _, _ = _AttentionFunction.apply(
        q, k, v, tq=tq, tk=tk, tv=tv, mask=mask, spec=spec, path=path
    )
    return o


# ---------------------------------------------------------------------------------------
# Routing torch.nn.functional.scaled_dot_product_attention
# ---------------------------------------------------------------------------------------


def _sdpa_mask_to_4d(mask: Tensor | None, q_ndim: int) -> Tensor | None:
    """An SDPA-style mask (broadcast against ``(..., S_q, S_k)``) as a 4-D mask."""
    if mask is None:
        return None
    if mask.ndim > q_ndim:
        raise ValueError(f"attn_mask has {mask.ndim} dims, more than the {q_ndim} of query")
    mask = mask.reshape((1,) * (q_ndim - mask.ndim) + tuple(mask.shape))
    return mask.unsqueeze(1) if q_ndim == 3 else mask


def _repeat_kv_heads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Grouped-query attention: repeat the key/value heads to the number of query heads."""
    hq, hk = q.shape[1], k.shape[1]
    if hk != v.shape[1] or hq % hk != 0:
        raise ValueError(
            f"enable_gqa needs query heads ({hq}) a multiple of key/value heads ({hk})"
        )
    return k.repeat_interleave(hq // hk, dim=1), v.repeat_interleave(hq // hk, dim=1)


def _sdpa_replacement(backend: str):
    """A function with SDPA's signature that calls :func:`attention`."""

    def scaled_dot_product_attention(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        if dropout_p != 0.0:
            raise ValueError(
                f"use_jvp_attention does not support dropout_p > 0 (got {dropout_p}): the "
                "tangent would need the primal's dropout mask; use dropout_p=0 (eval mode)"
            )
        if query.ndim not in (3, 4):
            raise ValueError(f"use_jvp_attention takes 3-D or 4-D query, got {tuple(query.shape)}")
        three_d = query.ndim == 3
        mask = _sdpa_mask_to_4d(attn_mask, query.ndim)
        if three_d:
            query, key, value = query[:, None], key[:, None], value[:, None]
        if is_causal:
            if mask is not None:
                raise ValueError("pass either attn_mask or is_causal=True, not both")
            s_q, s_k = query.shape[2], key.shape[2]
            tril = torch.ones(s_q, s_k, dtype=torch.bool, device=query.device).tril()
            mask = tril[None, None]
        if enable_gqa and key.shape[1] != query.shape[1]:
            key, value = _repeat_kv_heads(query, key, value)
        out = attention(query, key, value, attn_mask=mask, scale=scale, backend=backend)
        return out[:, 0] if three_d else out

    return scaled_dot_product_attention


@contextlib.contextmanager
def use_jvp_attention(*, backend: str = "auto") -> Iterator[None]:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` to :func:`attention`.

    For the duration of the ``with`` block every call that looks the function up on
    :mod:`torch.nn.functional` at call time (``F.scaled_dot_product_attention(...)``,
    including diffusers' native attention backend) goes to :func:`attention`, so
    :func:`torch.func.jvp` works through an unmodified model. Code that bound the function
    earlier (``from torch.nn.functional import scaled_dot_product_attention``) is not
    affected. The original is restored on exit, also on error; blocks nest.

    ``is_causal=True`` becomes a lower-triangular boolean mask (reference path) and
    ``enable_gqa`` repeats the key/value heads; ``dropout_p > 0`` raises ``ValueError``.
    3-D inputs ``(N, S, D)`` are accepted like SDPA. Unlike SDPA, all-masked rows are zeros.

    Not thread-safe: the patch is process-wide, so other threads calling SDPA meanwhile
    are routed too, and overlapping blocks in several threads can restore out of order.

    Args:
        backend: passed to :func:`attention` (``"auto"``, ``"triton"``, ``"reference"``).

    Yields:
        None.
    """
    check_choice("backend", backend, ATTENTION_BACKENDS)
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _sdpa_replacement(backend)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
