"""Derivative supervision during the warm-up (a hypothesis of the seed-method issue).

A discrete target supervises the student's *values* and never its ``du/dt``, the very term
the differential target is built from. MeanFlow's identity (arXiv 2505.13447, eq. 6) turns
the discrete target into a target for the derivative too: for the exact average velocity
``u = v - (t - r) du/dt``, so

    L_d = E || v - (t - r) du/dt - u_disc ||^2

with the gradient flowing *through* ``du/dt`` (forward-mode JVP inside reverse mode) trains
the derivative towards the one the discrete target implies. It is exactly the distance of
the differential target from the discrete one, ``delta``, made a loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["derivative_loss"]


def derivative_loss(student, z_t: Tensor, r: Tensor, t: Tensor, v: Tensor, u_disc: Tensor):
    """``mean_B ||v - (t - r) du/dt - u_disc||^2`` with gradients through ``du/dt``.

    Args:
        student: ``u(z, r, t)`` on points ``(B, D)``.
        z_t, v, u_disc: states, velocities and discrete targets ``(B, D)``.
        r, t: ``(B,)`` times.

    Returns:
        the scalar loss (attached to the student's parameters).
    """
    _, dudt = torch.func.jvp(lambda z, tt: student(z, r, tt), (z_t, t), (v, torch.ones_like(t)))
    implied = v - (t - r)[:, None] * dudt
    return (implied - u_disc).pow(2).sum(1).mean()
