"""One MeanFlow training step, written each way a library takes ``du/dt``.

Every step returns the loss of one batch; the runner calls ``loss.backward()``. All use the
same plain loss, ``mean((u - sg(v - (t - r) du/dt))^2)`` (MeanFlow, arXiv 2505.13447,
eq. 9-10), so they differ only in how ``u`` and ``du/dt`` are computed. The peers' steps
are written here from their public formulas (no code copied):

- py-meanflow (Geng et al.'s PyTorch port): ``u, du/dt = torch.func.jvp(u_fn, (z, t),
  (v, 1))`` in one pass, with the graph kept for the loss;
- FastGen, JVP: ``du/dt`` from a ``torch.func.jvp`` under ``no_grad``, then a training
  forward for ``u``;
- FastGen, finite difference: ``du/dt = (u(z + h v, t + h) - u(z - h v, t - h)) / 2h``
  under ``no_grad``, then a training forward;
- zhuyu-cs/MeanFlow: ``torch.autograd.functional.jvp(u_fn, (z, t), (v, 1),
  create_graph=True)`` (the double-backward trick, ``u`` keeping its graph).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mfcore.jvp import fd_step_size, torch_tangent_rules, total_derivative


@dataclass
class Batch:
    z: Tensor
    r: Tensor
    t: Tensor
    v: Tensor
    cond: dict = field(default_factory=dict)

    def gap(self) -> Tensor:
        return (self.t - self.r).view(-1, *([1] * (self.z.ndim - 1)))


def _loss(u: Tensor, b: Batch, dudt: Tensor) -> Tensor:
    target = (b.v - b.gap() * dudt).detach()
    return (u - target).square().mean()


def _along(model, b: Batch) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda z, t: model(z, b.r, t, **b.cond)


def flow_matching(model, b: Batch) -> Tensor:
    """The unit: a flow-matching step, ``u(z, t, t) = v(z, t)`` regressed on ``v``."""
    return (model(b.z, b.t, b.t, **b.cond) - b.v).square().mean()


def mfcore_one_forward(model, b: Batch) -> Tensor:
    u, dudt = total_derivative(model, b.z, b.r, b.t, b.v, cond=b.cond, keep_graph=True)
    return _loss(u, b, dudt)


def mfcore_torch_rules(model, b: Batch) -> Tensor:
    """mfcore's one forward with torch's own tangent rules (mfcore before issue 21's rules;
    the memory fix of the attention and of the saved tensors stays on)."""
    with torch_tangent_rules():
        return mfcore_one_forward(model, b)


def mfcore_two_pass(model, b: Batch) -> Tensor:
    _, dudt = total_derivative(model, b.z, b.r, b.t, b.v, cond=b.cond)
    return _loss(model(b.z, b.r, b.t, **b.cond), b, dudt)


def mfcore_fd(model, b: Batch) -> Tensor:
    u, dudt = total_derivative(model, b.z, b.r, b.t, b.v, cond=b.cond, keep_graph=True, method="fd")
    return _loss(u, b, dudt)


def py_meanflow(model, b: Batch) -> Tensor:
    u, dudt = torch.func.jvp(_along(model, b), (b.z, b.t), (b.v, torch.ones_like(b.t)))
    return _loss(u, b, dudt.detach())


def fastgen_jvp(model, b: Batch) -> Tensor:
    with torch.no_grad():
        _, dudt = torch.func.jvp(_along(model, b), (b.z, b.t), (b.v, torch.ones_like(b.t)))
    return _loss(model(b.z, b.r, b.t, **b.cond), b, dudt)


def fastgen_fd(model, b: Batch) -> Tensor:
    h = fd_step_size(b.z.dtype)
    with torch.no_grad():
        hi = model(b.z + h * b.v, b.r, b.t + h, **b.cond)
        lo = model(b.z - h * b.v, b.r, b.t - h, **b.cond)
    return _loss(model(b.z, b.r, b.t, **b.cond), b, (hi - lo) / (2 * h))


def zhuyu_cs(model, b: Batch) -> Tensor:
    u, dudt = torch.autograd.functional.jvp(
        _along(model, b), (b.z, b.t), (b.v, torch.ones_like(b.t)), create_graph=True
    )
    return _loss(u, b, dudt.detach())


#: The steps by name, in table order; the first is the unit, the second the reference of
#: the gradients' agreement (exact, torch's rules).
STEPS: dict[str, Callable[..., Tensor]] = {
    "flow matching (the unit)": flow_matching,
    "py-meanflow (func.jvp, one pass)": py_meanflow,
    "mfcore default (func, one forward)": mfcore_one_forward,
    "mfcore, torch's tangent rules": mfcore_torch_rules,
    "mfcore two passes (no-grad JVP, forward)": mfcore_two_pass,
    'mfcore jvp="fd"': mfcore_fd,
    "FastGen, JVP (no-grad JVP, forward)": fastgen_jvp,
    "FastGen, finite difference": fastgen_fd,
    "zhuyu-cs (autograd.functional.jvp)": zhuyu_cs,
}
