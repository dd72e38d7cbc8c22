"""Which attention a shared transformer runs, per call, so that du/dt can be taken through it.

``mfcore.jvp.total_derivative`` has three backends, and each needs something different from
attention: forward-mode AD (``"func"``) needs a tangent rule, which torch's fused SDPA
kernels lack and :mod:`mfcore.attention` has; the double-backward trick (``"autograd"``)
needs attention whose backward is itself differentiable (torch's math SDPA); the finite
difference needs neither. :func:`route_attention` wraps the ``forward`` of a model's
attention modules so that each call picks its attention from a shared mode:

- ``"auto"``: torch's SDPA, and :func:`mfcore.attention.use_jvp_attention` while the call's
  inputs carry a forward-mode tangent (inside ``torch.func.jvp`` or a dual level);
- ``"math"``: torch's math SDPA whenever gradients or tangents are tracked;
- ``"mfcore"``: :mod:`mfcore.attention` whenever gradients or tangents are tracked.

The choice depends only on state that is the same when gradient checkpointing recomputes a
block during the backward (grad mode, tangents), so a recomputation runs the attention of
the forward it replaces. Checkpointing cannot recompute a forward-mode AD forward at all:
:func:`checkpointing_off` switches it off for a call that takes a JVP with a graph.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.autograd import forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

from mfcore._checks import check_choice
from mfcore.attention import use_jvp_attention

__all__ = [
    "ATTENTION_MODES",
    "AttentionRouting",
    "attention_mode_for",
    "has_tangent",
    "route_attention",
    "checkpointing_off",
    "enable_gradient_checkpointing",
]

logger = logging.getLogger(__name__)

#: How a student's attention runs (see the module docstring).
ATTENTION_MODES = ("auto", "math", "mfcore")

# Which attention each backend of mfcore.jvp.total_derivative needs.
_ATTENTION_FOR_JVP = {"func": "auto", "autograd": "math", "fd": "auto"}


def attention_mode_for(jvp_method: str) -> str:
    """The attention mode that the JVP backend ``jvp_method`` needs."""
    return _ATTENTION_FOR_JVP[check_choice("jvp_method", jvp_method, _ATTENTION_FOR_JVP)]


def has_tangent(*xs: object) -> bool:
    """Whether a tensor among ``xs`` carries a forward-mode tangent."""
    return any(isinstance(x, Tensor) and fwAD.unpack_dual(x).tangent is not None for x in xs)


def _attention_context(mode: str, tangent: bool) -> contextlib.AbstractContextManager:
    if mode == "math" and (tangent or torch.is_grad_enabled()):
        return sdpa_kernel(SDPBackend.MATH)
    if tangent or (mode == "mfcore" and torch.is_grad_enabled()):
        return use_jvp_attention()
    return contextlib.nullcontext()


class AttentionRouting:
    """The attention mode shared by a student and the attention modules it wraps."""

    def __init__(self, mode: str = "auto") -> None:
        self.mode = check_choice("attention", mode, ATTENTION_MODES)


def _routed(forward: Callable[..., Any], routing: AttentionRouting) -> Callable[..., Any]:
    @functools.wraps(forward)
    def call(*args: Any, **kwargs: Any) -> Any:
        tangent = has_tangent(*args, *kwargs.values())
        with _attention_context(routing.mode, tangent):
            return forward(*args, **kwargs)

    call._mfcore_routing = routing  # type: ignore[attr-defined]
    return call


def route_attention(modules: Iterable[nn.Module], routing: AttentionRouting) -> int:
    """Run every module of ``modules`` inside ``routing``'s attention context, in place.

    The module's bound ``forward`` is wrapped once (a second routing of the same module is
    ignored), so any attention implementation that calls ``F.scaled_dot_product_attention``
    inside its forward is routed, whatever its signature.

    Returns:
        how many modules were wrapped now.
    """
    count = 0
    for module in modules:
        if hasattr(module.forward, "_mfcore_routing"):
            continue
        module.forward = _routed(module.forward, routing)
        count += 1
    return count


@contextlib.contextmanager
def checkpointing_off(model: nn.Module, off: bool) -> Iterator[None]:
    """Switch diffusers' gradient checkpointing of ``model`` off inside the block when ``off``.

    A no-op for models without diffusers' ``gradient_checkpointing`` flag.
    """
    saved = getattr(model, "gradient_checkpointing", None)
    if off and saved:
        logger.debug("gradient checkpointing is off while a JVP with a graph is taken")
        model.gradient_checkpointing = False
    try:
        yield
    finally:
        if saved is not None:
            model.gradient_checkpointing = saved


def _checkpoint(block: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False, **kwargs)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """diffusers' gradient checkpointing, with the blocks' keyword arguments passed on.

    diffusers' default checkpointing function takes positional arguments only, and
    HunyuanImage 2.1 calls its blocks with ``attention_mask=`` and ``image_rotary_emb=``
    (a ``TypeError`` in diffusers 0.42.1); this one forwards both kinds.

    Raises:
        TypeError: if ``model`` has no diffusers ``enable_gradient_checkpointing``.
    """
    if not hasattr(model, "enable_gradient_checkpointing"):
        raise TypeError(f"{type(model).__name__} has no diffusers gradient checkpointing")
    model.enable_gradient_checkpointing(gradient_checkpointing_func=_checkpoint)
