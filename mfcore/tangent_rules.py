"""Explicit forward-mode (JVP) rules for the layers a diffusion transformer is made of.

MeanFlow (Geng et al., arXiv 2505.13447, eq. 8) takes ``du/dt`` by forward-mode AD, where
torch's own tangent rules do more work than the tangent needs:

- ``linear``: torch's rule for ``x W^T + b`` also multiplies the input by the weight's
  tangent; inside :func:`mfcore.jvp.total_derivative` only ``(z, t)`` carry tangents, so
  that tangent does not exist and is filled with a dense zero matrix: one wasted matmul
  (and a zero matrix of the weight's size) per layer. The rule here is
  ``dy = dx W^T (+ x dW^T + db``, only for the tangents that exist).
- ``silu`` / ``gelu``: with grad mode on (the one-forward MeanFlow step), torch builds the
  tangent of SiLU from half a dozen element-wise ops; the derivative of an element-wise
  function is its backward with the tangent as the incoming gradient, one fused kernel
  (``silu_backward``, ``gelu_backward``).
- ``layer_norm``: the Jacobian of the normalisation ``(x - mean) / sqrt(var + eps)`` is
  symmetric, so its JVP is its vector-Jacobian product, torch's fused
  ``native_layer_norm_backward`` with the tangent as the gradient; the affine part is
  ``w * that (+ x_hat dw + db)``;
- ``rms_norm`` (torch's ``nn.RMSNorm``, FLUX's query/key norms): likewise symmetric,
  ``rstd (dx - x_hat mean(x_hat dx))``, written out in a few element-wise ops.

Beside the work, memory: autograd keeps the tangent of every tensor saved for the
backward until the forward-AD level closes (forward-over-reverse needs it); these rules
save their inputs without tangents (:func:`save_values`), so a one-forward MeanFlow step
does not hold a tangent beside each activation.

Each rule is an ``autograd.Function`` whose ``forward`` and ``backward`` are the ops and
backward formulas torch itself uses for that layer (``rms_norm``: its formulas, written
out), so reverse mode (the loss's gradient) is unchanged up to rounding, and whose ``jvp``
is the rule above. :func:`use_tangent_rules` routes ``torch.nn.functional.linear``,
``silu``, ``gelu``, ``layer_norm`` and ``rms_norm`` (and so ``nn.Linear``, peft's LoRA
layers, ``nn.SiLU``, ``nn.GELU``, ``nn.LayerNorm``, ``nn.RMSNorm`` and diffusers' blocks,
which call them) to these functions for the duration of a block, as
:func:`mfcore.attention.use_jvp_attention` routes attention. Calls the rules do not cover
(in-place activations, autocast, a ``torch.compile`` trace) go to torch's op unchanged:
compile silently drops a custom ``jvp``, so the rules stay out of compiled regions; they do
not support ``vmap``. The backwards are differentiable (double backward works) unless the
forward carried tangents (:func:`check_once_differentiable`); the tangents are computed
without a reverse-mode graph (MeanFlow's ``du/dt`` is stop-gradient), so no history of
theirs is kept alive.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor

from mfcore.path import compute_dtype

__all__ = ["use_tangent_rules"]

_aten = torch.ops.aten


def save_values(ctx, *tensors: Tensor | None) -> None:
    """``ctx.save_for_backward`` of the tensors' values, without their forward-AD tangents.

    autograd keeps the tangent of every tensor saved for the backward (for forward-over-
    reverse AD) until the forward-AD level closes, so a one-forward MeanFlow step would hold
    a tangent beside each saved activation. A tensor that carries a tangent is saved
    detached instead; the backward then refuses to build a graph (see
    :func:`check_once_differentiable`), since the detached value has none.
    """
    values, cut = [], False
    with fwAD._set_fwd_grad_enabled(True):  # off inside an autograd.Function's forward
        for x in tensors:
            if x is not None and fwAD.unpack_dual(x).tangent is not None:
                x, cut = x.detach(), True
            values.append(x)
    ctx.save_for_backward(*values)
    ctx.values_only = cut


def check_once_differentiable(ctx) -> None:
    """Raise in a backward asked to build a graph (``create_graph=True``) when
    :func:`save_values` saved values without their graph."""
    if ctx.values_only and torch.is_grad_enabled():
        raise RuntimeError(
            "double backward through a forward that carried forward-AD tangents is not "
            "supported (the saved values were kept without their tangents); for "
            "mfcore.jvp.total_derivative(keep_graph=True) pass detach_tangents=False"
        )


def _values(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The tensors without their tangents, for a ``jvp`` rule to read once.

    ``ctx.save_for_forward`` would keep the dual tensors, and so their tangents, alive as
    long as the backward node (until the backward); a ``jvp`` needs only values, and runs
    right after ``setup_context``, which hands them on through ``ctx.jvp_inputs``.
    """
    return tuple(None if x is None else x.detach() for x in tensors)


def _pop_jvp_inputs(ctx) -> tuple[Tensor | None, ...]:
    inputs = ctx.jvp_inputs
    del ctx.jvp_inputs
    return inputs


def _add(total: Tensor | None, term: Tensor | None) -> Tensor | None:
    """``total + term`` where either may be absent (no tangent)."""
    if term is None:
        return total
    return term if total is None else total + term


class _Rule(torch.autograd.Function):
    """An ``autograd.Function`` called with every argument positional.

    ``Function.apply`` binds a function with ``setup_context`` to ``forward``'s signature
    through ``inspect.signature`` on every call (about 25 us each on a CPU, 2.5 % of a small
    MLP's MeanFlow step); with all arguments given positionally the binding changes
    nothing, so :meth:`apply` goes to autograd's own ``apply`` directly. Under a functorch
    transform (where the rules are not used) it keeps ``Function.apply``'s path.
    """

    @classmethod
    def apply(cls, *args):
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        args = torch._functorch.utils.unwrap_dead_wrappers(args)  # as Function.apply does
        return super(torch.autograd.Function, cls).apply(*args)


class _Linear(_Rule):
    """``y = x W^T + b`` with the tangent ``dx W^T + x dW^T + db`` of the tangents present."""

    @staticmethod
    def forward(x, weight, bias):
        return _ORIGINAL["linear"](x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.set_materialize_grads(False)  # absent tangents arrive as None, not zeros
        save_values(ctx, x, weight)
        ctx.jvp_inputs = _values(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    @torch.no_grad()
    def jvp(ctx, dx, dweight, dbias):
        x, weight = _pop_jvp_inputs(ctx)
        linear = _ORIGINAL["linear"]
        out = None if dx is None else linear(dx, weight)
        out = _add(out, None if dweight is None else linear(x, dweight))
        return _add(out, dbias)

    @staticmethod
    def backward(ctx, grad):
        # The formulas of torch's addmm backward on the flattened input, as aten's linear
        # runs it: grad_x = g W, grad_W = g^T x (in W's layout), grad_b = sum_rows g.
        check_once_differentiable(ctx)
        if grad is None:  # no gradient reached the output
            return None, None, None
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = g2.mm(weight).view(x.shape) if need_x else None
        grad_w = g2.t().mm(x.reshape(-1, x.shape[-1])) if need_w else None
        grad_b = g2.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b


def _pointwise_derivative(name: str, approximate: str, x: Tensor, vec: Tensor) -> Tensor:
    """``f'(x) * vec`` for the activation ``name``: torch's fused backward kernel of ``f``."""
    if name == "gelu":
        return _aten.gelu_backward(vec, x, approximate=approximate)
    return _aten.silu_backward(vec, x)


class _Pointwise(_Rule):
    """An element-wise activation ``f`` (``"silu"`` or ``"gelu"``) whose JVP and VJP are
    both ``f'(x) * (.)``."""

    @staticmethod
    def forward(x, name, approximate):
        if name == "gelu":
            return _ORIGINAL["gelu"](x, approximate=approximate)
        return _ORIGINAL["silu"](x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, name, approximate = inputs
        ctx.set_materialize_grads(False)
        save_values(ctx, x)
        ctx.jvp_inputs = _values(x)
        ctx.name, ctx.approximate = name, approximate

    @staticmethod
    @torch.no_grad()
    def jvp(ctx, dx, *_):
        (x,) = _pop_jvp_inputs(ctx)
        return None if dx is None else _pointwise_derivative(ctx.name, ctx.approximate, x, dx)

    @staticmethod
    def backward(ctx, grad):
        check_once_differentiable(ctx)
        if grad is None:
            return None, None, None
        (x,) = ctx.saved_tensors
        if ctx.name == "silu" and torch.is_grad_enabled():  # double backward: as torch does,
            sig = torch.sigmoid(x)  # the composite (aten's silu_backward has no derivative)
            return grad * sig * (1 + x * (1 - sig)), None, None
        return _pointwise_derivative(ctx.name, ctx.approximate, x, grad), None, None


class _LayerNorm(_Rule):
    """``y = w * x_hat + b`` with ``x_hat = (x - mean) / sqrt(var + eps)`` over the last
    dims; the normalisation's Jacobian is symmetric, so its JVP is its VJP."""

    @staticmethod
    def forward(x, shape, weight, bias, eps):
        return _aten.native_layer_norm(x, shape, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, shape, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(mean, rstd)
        save_values(ctx, x, weight, bias, mean, rstd)
        ctx.jvp_inputs = _values(x, weight, mean, rstd)
        ctx.shape = shape

    @staticmethod
    @torch.no_grad()
    def jvp(ctx, dx, _shape, dweight, dbias, _eps):
        x, weight, mean, rstd = _pop_jvp_inputs(ctx)
        out = None
        if dx is not None:
            mask = [True, False, False]
            out = _aten.native_layer_norm_backward(dx, x, ctx.shape, mean, rstd, None, None, mask)
            out = out[0] if weight is None else out[0] * weight
        if dweight is not None:
            out = _add(out, (x - mean) * rstd * dweight)
        return _add(out, dbias), None, None

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_rstd):
        check_once_differentiable(ctx)
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need_x, _, need_w, need_b, _ = ctx.needs_input_grad
        if grad is None:
            return None, None, None, None, None
        mask = [need_x, need_w and weight is not None, need_b and bias is not None]
        gx, gw, gb = _aten.native_layer_norm_backward(
            grad, x, ctx.shape, mean, rstd, weight, bias, mask
        )
        return gx, None, gw, gb, None


class _RMSNorm(_Rule):
    """``y = w * x_hat`` with ``x_hat = x * rstd``, ``rstd = (mean(x^2) + eps)^(-1/2)`` over
    the last dims, computed as torch's ``rms_norm`` does (in fp32 for half inputs). The
    Jacobian of ``x_hat`` is ``rstd (I - x_hat x_hat^T / n)``, symmetric: JVP and VJP are
    the same map."""

    @staticmethod
    def forward(x, dims, weight, eps):
        work = x.to(compute_dtype(x.dtype))
        rstd = torch.rsqrt(work.pow(2).mean(dims, keepdim=True) + eps)
        out = work * rstd
        if weight is not None:
            out = out * weight
        return out.to(x.dtype), rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, dims, weight, _ = inputs
        _, rstd = output
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(rstd)
        save_values(ctx, x, weight, rstd)
        ctx.jvp_inputs = _values(x, weight, rstd)
        ctx.dims, ctx.eps = dims, inputs[3]

    @staticmethod
    def _normalized_map(x, rstd, vec, dims):
        """``rstd (vec - x_hat mean(x_hat vec))``, and ``x_hat``, in the compute dtype."""
        work = compute_dtype(x.dtype)
        x_hat = x.to(work) * rstd
        vec = vec.to(work)
        return rstd * (vec - x_hat * (x_hat * vec).mean(dims, keepdim=True)), x_hat

    @staticmethod
    @torch.no_grad()
    def jvp(ctx, dx, _dims, dweight, _eps):
        x, weight, rstd = _pop_jvp_inputs(ctx)
        out, x_hat = None, x.to(compute_dtype(x.dtype)) * rstd
        if dx is not None:
            out, _ = _RMSNorm._normalized_map(x, rstd, dx, ctx.dims)
            out = out if weight is None else out * weight
        if dweight is not None:
            out = _add(out, x_hat * dweight)
        return (None if out is None else out.to(x.dtype)), None

    @staticmethod
    def backward(ctx, grad, _grad_rstd):
        check_once_differentiable(ctx)
        x, weight, rstd = ctx.saved_tensors
        if grad is None:
            return None, None, None, None
        need_x, _, need_w, _ = ctx.needs_input_grad
        if torch.is_grad_enabled():  # double backward: rstd as a function of x
            work = x.to(compute_dtype(x.dtype))
            rstd = torch.rsqrt(work.pow(2).mean(ctx.dims, keepdim=True) + ctx.eps)
        scaled = grad if weight is None else grad * weight
        grad_x, x_hat = _RMSNorm._normalized_map(x, rstd, scaled, ctx.dims)
        grad_w = None
        if need_w and weight is not None:
            grad_w = grad * x_hat
            lead = tuple(range(grad.ndim - weight.ndim))
            grad_w = (grad_w.sum(lead) if lead else grad_w).to(weight.dtype)
        return (grad_x.to(x.dtype) if need_x else None), None, grad_w, None


# ---------------------------------------------------------------------------------------
# Routing torch.nn.functional
# ---------------------------------------------------------------------------------------

_ORIGINAL = {
    "linear": F.linear,
    "silu": F.silu,
    "gelu": F.gelu,
    "layer_norm": F.layer_norm,
    "rms_norm": F.rms_norm,
}


def _plain_call(x: Tensor) -> bool:
    """Whether a call on ``x`` may take a rule: not traced by ``torch.compile`` (which drops
    custom JVPs) and not under autocast (whose casts the hand-written backwards do not
    repeat)."""
    return not torch.compiler.is_compiling() and not torch.is_autocast_enabled(x.device.type)


def _linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    if _plain_call(input) and weight.ndim == 2 and input.ndim >= 1:
        return _Linear.apply(input, weight, bias)
    return _ORIGINAL["linear"](input, weight, bias)


def _silu(input: Tensor, inplace: bool = False) -> Tensor:
    if _plain_call(input) and not inplace:
        return _Pointwise.apply(input, "silu", "none")
    return _ORIGINAL["silu"](input, inplace=inplace)


def _gelu(input: Tensor, approximate: str = "none") -> Tensor:
    if _plain_call(input):
        return _Pointwise.apply(input, "gelu", approximate)
    return _ORIGINAL["gelu"](input, approximate=approximate)


def _layer_norm(
    input: Tensor,
    normalized_shape: list[int] | tuple[int, ...],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    if _plain_call(input):
        out, _, _ = _LayerNorm.apply(input, list(normalized_shape), weight, bias, eps)
        return out
    return _ORIGINAL["layer_norm"](input, normalized_shape, weight, bias, eps)


def _rms_norm(
    input: Tensor,
    normalized_shape: list[int] | tuple[int, ...],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    if _plain_call(input):
        eps = torch.finfo(input.dtype).eps if eps is None else eps
        dims = tuple(range(-len(normalized_shape), 0))
        out, _ = _RMSNorm.apply(input, dims, weight, eps)
        return out
    return _ORIGINAL["rms_norm"](input, normalized_shape, weight, eps)


_ROUTED = {
    "linear": _linear,
    "silu": _silu,
    "gelu": _gelu,
    "layer_norm": _layer_norm,
    "rms_norm": _rms_norm,
}


@contextlib.contextmanager
def use_tangent_rules() -> Iterator[None]:
    """Route ``F.linear``, ``F.silu``, ``F.gelu``, ``F.layer_norm`` and ``F.rms_norm`` to the
    explicit rules.

    For the duration of the block, every call that looks these functions up on
    :mod:`torch.nn.functional` at call time (``nn.Linear``, peft's LoRA ``Linear``,
    ``nn.SiLU``, ``nn.GELU``, ``nn.LayerNorm``, ``nn.RMSNorm``, diffusers' blocks) computes
    the same value
    and the same gradients, and under forward-mode AD (:func:`torch.func.jvp`,
    :mod:`torch.autograd.forward_ad`) the tangent with the rules of the module docstring.
    The originals are restored on exit, also on error; blocks nest. Like
    :func:`mfcore.attention.use_jvp_attention` the patch is process-wide (not thread-safe);
    :func:`mfcore.jvp.total_derivative` opens it around its ``"func"`` backend. The rules'
    functions do not support ``vmap``: do not open the block under ``torch.func.vmap``.

    Yields:
        None.

    Example:
        >>> import torch
        >>> from mfcore.tangent_rules import use_tangent_rules
        >>> layer, x, dx = torch.nn.Linear(3, 2), torch.randn(4, 3), torch.randn(4, 3)
        >>> with use_tangent_rules():
        ...     y, dy = torch.func.jvp(layer, (x,), (dx,))
        >>> torch.allclose(dy, dx @ layer.weight.T)
        True
    """
    saved = {name: getattr(F, name) for name in _ROUTED}
    for name, fn in _ROUTED.items():
        setattr(F, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)
