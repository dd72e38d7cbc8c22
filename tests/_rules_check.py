"""Shared check: the explicit tangent rules change neither ``u``, ``du/dt`` nor the gradients
of a one-forward MeanFlow step, and they do engage (fewer matmul FLOPs)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from mfcore.jvp import torch_tangent_rules, total_derivative


def one_forward_step(student, z, r, t, v, cond=None):
    """``u``, ``du/dt``, the gradients of a weighted loss on ``u``, and the matmul FLOPs."""
    params = [p for p in student.parameters() if p.requires_grad]
    student.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as flops:
        u, dudt = total_derivative(student, z, r, t, v, cond=cond, keep_graph=True)
        weights = torch.linspace(0.5, 1.5, u.numel(), dtype=u.dtype).view_as(u)
        (weights * u.square()).sum().backward()
    grads = [p.grad.clone() for p in params]
    return u.detach(), dudt, grads, flops.get_total_flops()


def assert_rules_change_nothing(student, z, r, t, v, cond=None, rtol=1e-10):
    """The step with the rules equals the step with torch's rules (fp64 tolerance ``rtol``
    relative to each tensor's largest entry) and executes fewer matmul FLOPs."""
    new = one_forward_step(student, z, r, t, v, cond)
    with torch_tangent_rules():
        old = one_forward_step(student, z, r, t, v, cond)
    pairs = [(new[0], old[0]), (new[1], old[1]), *zip(new[2], old[2], strict=True)]
    for a, b in pairs:
        scale = b.abs().max().clamp_min(1e-300).item()
        torch.testing.assert_close(a, b, rtol=0, atol=rtol * scale)
    assert new[3] < old[3], (new[3], old[3])
