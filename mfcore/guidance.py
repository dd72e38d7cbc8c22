"""Classifier-free guidance for teachers, and MeanFlow's guided training velocity.

Classifier-free guidance (Ho & Salimans, arXiv 2207.12598) combines a conditional and
an unconditional velocity, ``v_cfg = v_u + omega (v_c - v_u)``. A distilled student
learns the guided field directly, so one student call replaces two teacher calls.

MeanFlow (arXiv 2505.13447, Sec. 4.2, eqs. 19-21) trains the guided field from data by
replacing ``v`` with

    v_tilde = omega v + kappa u(z_t, t, t | c) + (1 - omega - kappa) u(z_t, t, t | null),

where ``u(., t, t)`` is the student's own instantaneous velocity (no gradient); the
effective guidance scale is ``omega / (1 - kappa)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from mfcore._checks import check_like

__all__ = ["cfg_velocity", "ClassifierFreeGuidance", "MeanFlowGuidance"]

CondMap = Mapping[str, Any] | Callable[[dict[str, Any]], dict[str, Any]]


def cfg_velocity(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """``v_u + scale (v_c - v_u)``; ``scale = 1`` is the conditional velocity.

    Args:
        v_cond, v_uncond: velocities ``(B, ...)`` of the same shape.
        scale: guidance scale omega.
    """
    check_like("v_uncond", v_uncond, v_cond, "v_cond")
    return v_uncond + scale * (v_cond - v_uncond)


def _uncond_kwargs(uncond: CondMap, cond: dict[str, Any]) -> dict[str, Any]:
    if callable(uncond):
        out = uncond(cond)
        if not isinstance(out, Mapping):
            raise TypeError("uncond(cond) must return a mapping of keyword arguments")
        return dict(out)
    return {**cond, **uncond}


def _check_uncond(uncond: object) -> None:
    if not (callable(uncond) or isinstance(uncond, Mapping)):
        raise TypeError(
            "uncond must be a mapping of keyword overrides (e.g. {'y': null_label}) or a "
            f"callable cond -> cond, got {type(uncond).__name__}"
        )


class ClassifierFreeGuidance:
    """A two-pass guided teacher as one :class:`~mfcore.fields.VelocityField`.

    Args:
        model: ``model(z, t, **cond)``.
        scale: guidance scale omega.
        uncond: the unconditional branch's conditioning: a mapping that overrides keys of
            ``cond`` (e.g. ``{"y": null_label}``), or a callable ``cond -> uncond_cond``.
    """

    def __init__(self, model: Callable[..., Tensor], scale: float, uncond: CondMap) -> None:
        _check_uncond(uncond)
        self.model, self.scale, self.uncond = model, float(scale), uncond

    def __call__(self, z: Tensor, t: Tensor, **cond: Any) -> Tensor:
        v_c = self.model(z, t, **cond)
        if self.scale == 1.0:
            return v_c
        v_u = self.model(z, t, **_uncond_kwargs(self.uncond, cond))
        return cfg_velocity(v_c, v_u, self.scale)


class MeanFlowGuidance:
    """MeanFlow's guided training velocity (arXiv 2505.13447, eq. 21), for :class:`MeanFlowLoss`.

    Args:
        omega: weight of the conditional velocity ``v``.
        kappa: weight of the student's conditional ``u(z_t, t, t | c)``; ``0 <= kappa < 1``.
        uncond: the unconditional conditioning (see :class:`ClassifierFreeGuidance`).

    Called by the loss as ``guidance(v, student, z_t, t, cond) -> v_tilde`` under no_grad.
    """

    def __init__(self, omega: float, kappa: float = 0.0, *, uncond: CondMap) -> None:
        if not omega > 0:
            raise ValueError(f"omega must be positive, got {omega!r}")
        if not 0.0 <= kappa < 1.0:
            raise ValueError(f"kappa must lie in [0, 1), got {kappa!r}")
        _check_uncond(uncond)
        self.omega, self.kappa, self.uncond = float(omega), float(kappa), uncond

    def __call__(
        self,
        v: Tensor,
        student: Callable[..., Tensor],
        z_t: Tensor,
        t: Tensor,
        cond: dict[str, Any],
    ) -> Tensor:
        rest = 1.0 - self.omega - self.kappa
        with torch.no_grad():
            out = self.omega * v
            if self.kappa != 0.0:
                out = out + self.kappa * student(z_t, t, t, **cond)
            if rest != 0.0:
                out = out + rest * student(z_t, t, t, **_uncond_kwargs(self.uncond, cond))
        return out
