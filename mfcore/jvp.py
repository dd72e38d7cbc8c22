"""The total derivative ``du/dt`` of a mean-velocity field along the flow.

MeanFlow (Geng et al., arXiv 2505.13447, eq. 8) differentiates the student
``u(z_t, r, t)`` along the trajectory of the flow: with ``dz_t/dt = v``, ``dr/dt = 0``
and ``dt/dt = 1``,

    du/dt = v . d_z u + d_t u,

the Jacobian-vector product of ``u`` with the tangent ``(v, 0, 1)``. Three backends
compute it:

- ``"func"``: forward-mode AD with :func:`torch.func.jvp` (exact, one forward's worth of
  extra work; needs every op to have a forward-mode rule: use :mod:`mfcore.attention` for
  attention). ``nn.Linear`` (peft's LoRA layers too), ``LayerNorm``, ``RMSNorm``, ``GELU``
  and ``SiLU`` take the explicit tangent rules of :mod:`mfcore.tangent_rules` for the
  duration of the call (torch's rule for a linear layer does a wasted matmul with the
  weights' zero tangent), except inside a functorch transform;
- ``"autograd"``: the double-backward trick ``J t = d/dw <J^T w, t>`` (exact, works for ops
  with only reverse-mode rules, about two backwards of extra work);
- ``"fd"``: a central finite difference along the tangent, computed in at least fp32
  (approximate, two extra forwards, no AD at all; the difference is taken in at least fp32).

**One forward for both** (``keep_graph=True``): the forward that gives ``du/dt`` also
builds the graph of ``u`` for the loss. Forward-mode AD then records every tangent
computation for reverse mode too (the tangent depends on the trained weights), and that
history, never back-propagated through (``du/dt`` is stop-gradient), would keep about one
more set of activations alive until the backward. With ``detach_tangents`` (the default)
each submodule's output tangent is detached from its history as the module returns, so
the history lives for one module at a time. autograd also keeps the tangent of every
tensor saved for the backward until the forward-AD level closes; the tangent rules and
:func:`mfcore.attention.attention` save their inputs without tangents, so at the peak the
step holds little more than a flow-matching step (docs/benchmarks.md). Their backwards
then refuse ``create_graph=True`` (double backward through ``u``): pass
``detach_tangents=False`` for that.

Models whose attention calls :func:`mfcore.attention.attention` work with ``"func"`` as
they are (``"autograd"`` too: its backward is twice differentiable); for models calling
``F.scaled_dot_product_attention`` (diffusers), pass ``route_sdpa=True`` so those calls go
to :func:`mfcore.attention.attention` during the JVP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from mfcore._checks import (
    check_cond,
    check_interval,
    check_like,
    check_real,
    check_student_output,
    check_tensor,
    lookup,
)
from mfcore.attention import use_jvp_attention
from mfcore.path import FlowPoint, compute_dtype
from mfcore.tangent_rules import use_tangent_rules

__all__ = [
    "JVP_BACKENDS",
    "JVP_METHODS",
    "JvpOptions",
    "along_flow",
    "total_derivative",
    "fd_step_size",
    "torch_tangent_rules",
]

logger = logging.getLogger(__name__)


def fd_step_size(dtype: torch.dtype) -> float:
    """Step of the central difference in ``dtype``: ``eps ** (1/3)``.

    The truncation error of a central difference is O(h^2) and its rounding error
    O(eps / h); ``h = eps^(1/3)`` balances the two (about 4.9e-3 in fp32, 6.1e-6 in fp64).
    """
    return math.pow(torch.finfo(dtype).eps, 1.0 / 3.0)


def rng_state(device: torch.device) -> Tensor:
    """The RNG state a forward on ``device`` draws from (dropout masks and the like)."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def restore_rng(state: Tensor, device: torch.device) -> None:
    """Rewind the RNG of ``device`` to ``state`` (from :func:`rng_state`)."""
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def total_derivative(
    u_fn: Callable[..., Tensor],
    z: Tensor,
    r: Tensor,
    t: Tensor,
    v: Tensor,
    *,
    method: str = "func",
    cond: Mapping[str, Any] | None = None,
    keep_graph: bool = False,
    fd_step: float | None = None,
    route_sdpa: bool = False,
    detach_tangents: bool = True,
) -> tuple[Tensor, Tensor]:
    """Evaluate ``u = u_fn(z, r, t, **cond)`` and its total derivative along ``(v, 0, 1)``.

    Args:
        u_fn: the student, ``u_fn(z, r, t, **cond) -> (B, ...)``.
        z: state ``(B, ...)`` at time ``t``.
        r: end times ``(B,)``, ``r <= t``.
        t: start times ``(B,)`` in ``[0, 1]``.
        v: the velocity ``dz_t/dt`` at ``(z, t)``, shape ``(B, ...)`` (the teacher's, or
            ``eps - x`` when training from data).
        method: ``"func"``, ``"autograd"`` or ``"fd"`` (see the module docstring).
        cond: conditioning passed to ``u_fn`` as keyword arguments.
        keep_graph: return ``u`` attached to the autograd graph, so the forward that gave
            the derivative also serves the loss. When False both outputs are detached and
            nothing is kept alive.
        fd_step: step ``h`` of the finite difference (default :func:`fd_step_size` of z's
            dtype: coarse in half precision, where ``"func"`` is the better choice). Models
            that embed ``1000 t`` in sinusoids (FLUX) need a much smaller step, chosen for
            their time scale.
        route_sdpa: with ``"func"`` or ``"autograd"``, route
            ``F.scaled_dot_product_attention`` to :func:`mfcore.attention.attention` for the
            duration of the JVP (torch's fused kernels have neither forward-mode rules nor
            double backward); see :func:`mfcore.attention.use_jvp_attention` (process-wide,
            not thread-safe). With ``keep_graph`` the backward through ``u`` then also runs
            through :func:`mfcore.attention.attention`.
        detach_tangents: with ``"func"``, ``keep_graph`` and an ``nn.Module`` ``u_fn``,
            detach every submodule's output tangent from its reverse-mode history (see the
            module docstring): the same values, without the tangents' graph held until
            the backward. The forward then runs under :mod:`torch.autograd.forward_ad`
            (functorch's wrappers hide the tangents from module hooks); inside a functorch
            transform, or where forward_ad raises ``NotImplementedError`` (a
            ``torch.compile``-d model), it falls back to :func:`torch.func.jvp` with the
            history kept (logged). Outputs that are tensors, tuples or lists are cut.
            With the cut, the tangent rules and :mod:`mfcore.attention` also save their
            inputs for the backward without tangents, and ``u`` is then differentiable
            once (a ``create_graph=True`` backward through it raises ``RuntimeError``).

    Returns:
        ``(u, dudt)``, both shaped like ``z``; ``dudt`` is always detached (MeanFlow's
        stop-gradient) and has the dtype of ``u``.

    Raises:
        TypeError / ValueError: on bad input (naming the argument).

    Example:
        For ``u(z, r, t) = t z`` along ``(v, 0, 1)``: ``du/dt = t v + z``.

        >>> import torch
        >>> from mfcore import total_derivative
        >>> z, v = torch.ones(3, 2), torch.full((3, 2), 2.0)
        >>> r, t = torch.zeros(3), torch.full((3,), 0.5)
        >>> u, dudt = total_derivative(lambda z, r, t: t[:, None] * z, z, r, t, v)
        >>> dudt[0]
        tensor([2., 2.])
    """
    check_tensor("z", z, ndim_min=1)
    r, t = check_interval(r, t, z)
    check_like("v", v, z)
    backend = lookup("method", method, JVP_BACKENDS)
    if fd_step is not None:
        check_real("fd_step", fd_step, minimum=0.0, strict=True)
    cond = check_cond(cond)
    options = JvpOptions(keep_graph, fd_step, route_sdpa, detach_tangents)
    return along_flow(backend, u_fn, FlowPoint(z, r, t, v, cond), options)


@dataclass(frozen=True)
class JvpOptions:
    """How :func:`total_derivative` takes ``du/dt`` besides its backend (its arguments of
    the same names)."""

    keep_graph: bool = False
    fd_step: float | None = None
    route_sdpa: bool = False
    detach_tangents: bool = True


def along_flow(
    backend: _Backend, u_fn: Callable[..., Tensor], point: FlowPoint, options: JvpOptions
) -> tuple[Tensor, Tensor]:
    """:func:`total_derivative` with a backend of :data:`JVP_BACKENDS`. Internal: the
    arguments are trusted (validate at the public entry); the model's output is checked."""
    z = point.z
    point = dataclasses.replace(point, v=point.v.to(z.dtype))
    u, dudt = backend(u_fn, point, options)
    check_student_output(u)
    if u.shape != z.shape:
        raise ValueError(f"u_fn returned shape {tuple(u.shape)}, expected z's {tuple(z.shape)}")
    return u, dudt.detach().to(u.dtype)


def _func(u_fn, point: FlowPoint, options: JvpOptions):
    """The ``"func"`` backend: forward-mode AD with the explicit tangent rules, the
    tangents' history cut when asked."""
    keep_graph = options.keep_graph
    cut = options.detach_tangents and keep_graph and torch.is_grad_enabled()
    with _routing(options.route_sdpa), _rules():
        if cut and isinstance(u_fn, nn.Module) and _plain_forward_ad():
            try:
                return _jvp_dual_cut(u_fn, point)
            except NotImplementedError as err:  # e.g. a compiled region: no dual rule
                logger.warning(
                    "detach_tangents: forward_ad failed (%s); using torch.func.jvp with "
                    "the tangents' history kept",
                    str(err).splitlines()[0][:120],
                )
        return _jvp_func(u_fn, point, keep_graph)


def _autograd(u_fn, point: FlowPoint, options: JvpOptions):
    """The ``"autograd"`` backend: the double-backward trick."""
    with _routing(options.route_sdpa):
        return _jvp_autograd(u_fn, point, options.keep_graph)


def _fd(u_fn, point: FlowPoint, options: JvpOptions):
    """The ``"fd"`` backend: a central finite difference (no AD, no attention routing)."""
    return _jvp_fd(u_fn, point, options.keep_graph, options.fd_step)


def _routing(route_sdpa: bool) -> contextlib.AbstractContextManager:
    return use_jvp_attention() if route_sdpa else contextlib.nullcontext()


_TANGENT_RULES = True  # off inside torch_tangent_rules()


@contextlib.contextmanager
def torch_tangent_rules() -> Iterator[None]:
    """Inside the block, :func:`total_derivative`'s ``"func"`` path uses torch's own tangent
    rules instead of :mod:`mfcore.tangent_rules` (process-wide; the previous setting is
    restored on exit). For comparisons: the values agree to rounding, the FLOPs and the
    peak memory do not.

    Example:
        >>> import torch
        >>> f = lambda z, r, t: torch.nn.functional.linear(z, torch.eye(2)) * t[:, None]
        >>> z, r, t = torch.ones(1, 2), torch.zeros(1), torch.ones(1)
        >>> with torch_tangent_rules():
        ...     u, dudt = total_derivative(f, z, r, t, torch.zeros(1, 2))
        >>> dudt
        tensor([[1., 1.]])
    """
    global _TANGENT_RULES
    previous, _TANGENT_RULES = _TANGENT_RULES, False
    try:
        yield
    finally:
        _TANGENT_RULES = previous


def _rules() -> contextlib.AbstractContextManager:
    """:func:`mfcore.tangent_rules.use_tangent_rules`, unless a functorch transform is
    active around the call (the rules do not support vmap) or the switch is off."""
    outside = torch._C._functorch.peek_interpreter_stack() is None
    return use_tangent_rules() if _TANGENT_RULES and outside else contextlib.nullcontext()


_Backend = Callable[..., tuple[Tensor, Tensor]]

#: The backends of :func:`total_derivative` by name (see the module docstring).
JVP_BACKENDS: Mapping[str, _Backend] = MappingProxyType(
    {"func": _func, "autograd": _autograd, "fd": _fd}
)

#: Names of the backends.
JVP_METHODS: tuple[str, ...] = tuple(JVP_BACKENDS)


def _plain_forward_ad() -> bool:
    """Whether a forward-AD level of :mod:`torch.autograd.forward_ad` can open here (no
    functorch transform and no other dual level active)."""
    no_transform = torch._C._functorch.peek_interpreter_stack() is None
    return no_transform and fwAD._current_level < 0


def _jvp_dual_cut(u_fn, point: FlowPoint):
    """The keep-graph forward with :mod:`torch.autograd.forward_ad`, every submodule's output
    tangent detached from its history (functorch's wrappers would hide the tangents)."""
    z, r, t, v, cond = point.z, point.r, point.t, point.v, point.cond
    with fwAD.dual_level(), _tangent_history_cut(u_fn):
        out = u_fn(fwAD.make_dual(z, v), r, fwAD.make_dual(t, torch.ones_like(t)), **cond)
        if not isinstance(out, Tensor):
            raise TypeError(f"u_fn must return a tensor, got {type(out).__name__}")
        u, dudt = fwAD.unpack_dual(out)
    return u, (torch.zeros_like(u) if dudt is None else dudt)


def _cut_tangent(x: Any) -> Any:
    """``x`` with each dual tensor's tangent detached from its reverse-mode history."""
    if isinstance(x, Tensor):
        primal, tangent = fwAD.unpack_dual(x)
        if tangent is None or tangent.grad_fn is None:
            return x
        return fwAD.make_dual(primal, tangent.detach())
    if isinstance(x, tuple):
        items = [_cut_tangent(item) for item in x]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    if isinstance(x, list):
        return [_cut_tangent(item) for item in x]
    return x


def _cut_hook(module: nn.Module, args: tuple, output: Any) -> Any:
    return _cut_tangent(output)


@contextlib.contextmanager
def _tangent_history_cut(model: nn.Module) -> Iterator[None]:
    """Detach the tangents of every submodule's outputs of ``model`` as they are produced,
    for the duration of the block."""
    handles = [m.register_forward_hook(_cut_hook) for m in model.modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _jvp_func(u_fn, point: FlowPoint, keep_graph: bool):
    z, r, t, v, cond = point.z, point.r, point.t, point.v, point.cond

    def along(z_, t_):
        return u_fn(z_, r, t_, **cond)

    with torch.set_grad_enabled(keep_graph and torch.is_grad_enabled()):
        u, dudt = torch.func.jvp(along, (z, t), (v, torch.ones_like(t)))
    return (u if keep_graph else u.detach()), dudt


def _jvp_autograd(u_fn, point: FlowPoint, keep_graph: bool):
    z, r, t, v, cond = point.z, point.r, point.t, point.v, point.cond
    # J (v, 1) = d/dw <J^T w, (v, 1)>: the vector-Jacobian product is linear in w, so its
    # gradient with respect to w is the Jacobian-vector product.
    with torch.enable_grad():
        # Inputs that already carry a graph keep it, so u stays differentiable in z and t.
        z_ = z if z.requires_grad else z.detach().requires_grad_(True)
        t_ = t if t.requires_grad else t.detach().requires_grad_(True)
        u = u_fn(z_, r, t_, **cond)
        check_student_output(u)
        w = torch.zeros_like(u, requires_grad=True)
        g_z, g_t = torch.autograd.grad(u, (z_, t_), w, create_graph=True, allow_unused=True)
        inner = u.new_zeros(())
        if g_z is not None:
            inner = inner + (g_z * v).sum()
        if g_t is not None:
            inner = inner + g_t.sum()
        if not inner.requires_grad:  # u does not depend on (z, t) at all
            return (u if keep_graph else u.detach()), torch.zeros_like(u)
        (dudt,) = torch.autograd.grad(inner, w, retain_graph=keep_graph)
    return (u if keep_graph else u.detach()), dudt


def _jvp_fd(u_fn, point: FlowPoint, keep_graph: bool, fd_step: float | None):
    z, r, t, v, cond = point.z, point.r, point.t, point.v, point.cond
    # Central difference along (v, 0, 1), with the stencil kept inside r <= t' <= 1, so the
    # student only ever sees valid intervals: a sample within h of either end uses an
    # asymmetric two-point difference (first order there). Where the stencil has no room
    # at all (r = t = 1) du/dt is reported as 0; the target multiplies it by t - r = 0.
    # The model sees states in z's dtype (times in at least fp32, as the solvers give
    # them); the step suits z's precision and the difference is taken in at least fp32.
    work = compute_dtype(z.dtype)
    h = fd_step if fd_step is not None else fd_step_size(z.dtype)
    zw, vw, rw, tw = z.to(work), v.to(work), r.to(work), t.to(work)
    t_hi = (tw + h).clamp(max=1.0)
    t_lo = torch.maximum(tw - h, rw)
    width = t_hi - t_lo
    shape = (-1,) + (1,) * (z.ndim - 1)
    z_hi = (zw + (t_hi - tw).view(shape) * vw).to(z.dtype)
    z_lo = (zw - (tw - t_lo).view(shape) * vw).to(z.dtype)
    # The three forwards draw the same random numbers (dropout masks), so the difference
    # is that of one function, and u is that function too.
    state = rng_state(z.device)
    with torch.no_grad():
        u_hi = u_fn(z_hi, rw, t_hi, **cond).to(work)
        restore_rng(state, z.device)
        u_lo = u_fn(z_lo, rw, t_lo, **cond).to(work)
        restore_rng(state, z.device)
        safe = torch.where(width > 0, width, torch.ones_like(width)).view(shape)
        dudt = torch.where(width.view(shape) > 0, (u_hi - u_lo) / safe, torch.zeros_like(u_hi))
    with torch.set_grad_enabled(keep_graph and torch.is_grad_enabled()):
        u = u_fn(z, r, t, **cond)
    return (u if keep_graph else u.detach()), dudt
