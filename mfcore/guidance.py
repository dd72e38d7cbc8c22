"""Classifier-free guidance for teachers, and MeanFlow's guided training velocity.

Classifier-free guidance (Ho & Salimans, arXiv 2207.12598) combines a conditional and
an unconditional velocity, ``v_cfg = v_u + omega (v_c - v_u)``. A distilled student
learns the guided field directly, so one student call replaces two teacher calls.

MeanFlow (arXiv 2505.13447, Sec. 4.2, eqs. 19-21) trains the guided field from data by
replacing ``v`` with

    v_tilde = omega v + kappa u(z_t, t, t | c) + (1 - omega - kappa) u(z_t, t, t | null),

where ``u(., t, t)`` is the student's own instantaneous velocity (no gradient); the
effective guidance scale is ``omega / (1 - kappa)``. As the reference implementations do, it
guides only inside a window of ``t``, and trains the samples whose label was dropped on the
null condition with the plain ``v`` (:class:`MeanFlowGuidance`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mfcore._checks import (
    check_fraction,
    check_instance,
    check_like,
    check_real,
    check_same_device,
)

__all__ = ["cfg_velocity", "apg_velocity", "ClassifierFreeGuidance", "MeanFlowGuidance"]

CondMap = Mapping[str, Any] | Callable[[dict[str, Any]], dict[str, Any]]


def cfg_velocity(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """``v_u + scale (v_c - v_u)``; ``scale = 1`` is the conditional velocity.

    Args:
        v_cond, v_uncond: velocities ``(B, ...)`` of the same shape.
        scale: guidance scale omega, a finite real number.
    """
    check_like("v_uncond", v_uncond, v_cond, "v_cond")
    scale = check_real("scale", scale)
    return v_uncond + scale * (v_cond - v_uncond)


def apg_velocity(
    v_cond: Tensor,
    v_uncond: Tensor,
    scale: float,
    *,
    eta: float = 0.0,
    norm_threshold: float = 0.0,
) -> Tensor:
    """Adaptive projected guidance without momentum (Sadat et al., arXiv 2410.02416), on the
    velocities as HunyuanImage 2.1's release applies it.

    Per sample, with norms over all but the batch dimension: the guidance direction
    ``d = v_c - v_u`` is first shrunk to norm at most ``norm_threshold`` (0: no limit), then
    split into its part along ``v_c`` and the rest, and the part along ``v_c`` (which
    over-saturates at high scales) is kept with weight ``eta``:

        d_par = (d . n) n,  n = v_c / |v_c|,   v = v_u + scale ((d - d_par) + eta d_par).

    ``eta = 1`` with no threshold is :func:`cfg_velocity`. The projection runs in fp64.

    Args:
        v_cond, v_uncond: velocities ``(B, ...)`` of the same shape.
        scale: guidance scale, a finite real number.
        eta: weight of the part of ``d`` along ``v_c``, ``>= 0``.
        norm_threshold: largest norm of ``d`` per sample, ``>= 0`` (0: none).

    Returns:
        ``(B, ...)`` in ``v_cond``'s dtype.

    Example:
        >>> import torch
        >>> v_c, v_u = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
        >>> apg_velocity(v_c, v_u, 2.0)  # d = (1, -1): only its part across v_c counts
        tensor([[ 1., -1.]])
        >>> apg_velocity(v_c, v_u, 2.0, eta=1.0)  # the whole d: classifier-free guidance
        tensor([[ 3., -1.]])
    """
    check_like("v_uncond", v_uncond, v_cond, "v_cond")
    scale = check_real("scale", scale)
    eta = check_real("eta", eta, minimum=0.0)
    norm_threshold = check_real("norm_threshold", norm_threshold, minimum=0.0)
    dims = tuple(range(1, v_cond.dim()))
    d = (v_cond - v_uncond).double()
    if norm_threshold > 0:
        norm = torch.linalg.vector_norm(d, dim=dims, keepdim=True)
        d = d * torch.clamp(norm_threshold / norm, max=1.0)  # (a zero d: inf -> 1)
    n = torch.nn.functional.normalize(v_cond.double(), dim=dims)
    par = (d * n).sum(dim=dims, keepdim=True) * n
    update = (d - par) + eta * par
    return (v_uncond.double() + scale * update).to(v_cond.dtype)


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
        self.model, self.scale, self.uncond = model, check_real("scale", scale), uncond

    def __call__(self, z: Tensor, t: Tensor, **cond: Any) -> Tensor:
        v_c = self.model(z, t, **cond)
        if self.scale == 1.0:
            return v_c
        v_u = self.model(z, t, **_uncond_kwargs(self.uncond, cond))
        return cfg_velocity(v_c, v_u, self.scale)


class MeanFlowGuidance:
    """MeanFlow's guided training velocity (arXiv 2505.13447, Sec. 4.2, eqs. 19-21).

    For :class:`~mfcore.losses.MeanFlowLoss` (``MeanFlowLoss(guidance=...)``). Per sample,

        v_tilde = omega v + kappa u(z_t, t, t | c) + (1 - omega - kappa) u(z_t, t, t | null)
                  if t_min <= t <= t_max and the sample keeps its condition,
        v_tilde = v  otherwise,

    where ``u(., t, t)`` is the student's own instantaneous velocity, evaluated without
    gradient (eq. 21; the effective guidance scale is ``omega / (1 - kappa)``). ``v_tilde``
    replaces ``v`` both in the target and as the JVP tangent:
    ``u_tgt = v_tilde - (t - r) du/dt`` with ``du/dt`` along ``(v_tilde, 0, 1)``.

    With probability ``label_dropout`` a sample's condition is dropped: the student sees
    the null condition ``uncond`` for it and it trains on the unguided ``v``, which is
    unconditional MeanFlow. Those samples are what teaches ``u(. | null)``, the term the
    guided velocity is built from. This is what the official JAX MeanFlow, NVlabs/FastGen and
    zhuyu-cs/MeanFlow do (window on ``t`` inclusive at both ends, dropped samples unguided);
    the tests hold mfcore to their values. The guidance passes run with dropout off
    (``eval_mode=True``), as in the JAX reference and FastGen; zhuyu-cs/MeanFlow runs them in
    the model's current mode (train mode, in its training script), which ``eval_mode=False``
    reproduces. The two differ only for a network with dropout.

    ``MeanFlowGuidance(omega, kappa, uncond=..., label_dropout=0.0, eval_mode=False)``
    is the behaviour before this was the default: every sample guided with its own
    condition, the guidance passes in the student's current mode.

    Args:
        omega: weight ``omega > 0`` of the conditional velocity ``v``.
        kappa: weight of the student's conditional ``u(z_t, t, t | c)``; ``0 <= kappa < 1``.
        uncond: the null condition: a mapping that overrides keys of ``cond``, e.g.
            ``{"y": null_label}`` (a number, or a tensor that broadcasts to ``cond["y"]``,
            which the student then sees broadcast to its shape: see :meth:`null_condition`),
            or a callable ``cond -> uncond_cond``.
        t_min, t_max: the guidance window on ``t``, inclusive, ``0 <= t_min <= t_max <= 1``.
        label_dropout: probability in ``[0, 1)`` that :class:`~mfcore.losses.MeanFlowLoss`
            drops a sample's condition. ``None`` means 0.1 (the peers' value) and warns that
            this default changed (there used to be no label dropout); pass it to silence.
        eval_mode: run the guidance passes with every submodule of an ``nn.Module`` student
            in eval mode (dropout off), restoring each module's own mode afterwards (the JAX
            reference, FastGen); ``False`` runs them in the student's current mode
            (zhuyu-cs/MeanFlow).

    Called as ``guidance(v, student, z_t, t, cond, *, drop=None) -> v_tilde`` with ``v`` and
    ``z_t`` of shape ``(B, ...)``, ``t`` and ``drop`` of shape ``(B,)``.

    Example:
        >>> import torch
        >>> from mfcore import MeanFlowGuidance, MeanFlowLoss
        >>> guidance = MeanFlowGuidance(1.5, 0.5, uncond={"y": 10}, label_dropout=0.1)
        >>> student = lambda z, r, t, y: z * (y[:, None] < 10)
        >>> loss_fn = MeanFlowLoss(guidance=guidance)
        >>> y = torch.randint(0, 10, (8,))
        >>> loss, metrics = loss_fn(student, torch.randn(8, 2), cond={"y": y})
        >>> sorted(k for k in metrics if k.startswith("frac_"))
        ['frac_dropped', 'frac_guided', 'frac_r_neq_t']
    """

    def __init__(
        self,
        omega: float,
        kappa: float = 0.0,
        *,
        uncond: CondMap,
        t_min: float = 0.0,
        t_max: float = 1.0,
        label_dropout: float | None = None,
        eval_mode: bool = True,
    ) -> None:
        self.omega = check_real("omega", omega, minimum=0.0, strict=True)
        self.kappa = check_fraction("kappa", kappa, below_one=True)
        _check_uncond(uncond)
        self.t_min = check_fraction("t_min", t_min)
        self.t_max = check_fraction("t_max", t_max)
        if self.t_max < self.t_min:
            raise ValueError(f"t_max must satisfy t_min <= t_max <= 1, got {t_max!r}")
        if label_dropout is None:
            warnings.warn(
                "MeanFlowGuidance now drops 10% of the labels (label_dropout=0.1), trains "
                "them unguided on the null condition and runs the guidance passes in eval "
                "mode, as the MeanFlow reference does; it used to guide every sample. Pass "
                "label_dropout= to silence this; label_dropout=0.0, eval_mode=False restores "
                "the old behaviour.",
                UserWarning,
                stacklevel=2,
            )
            label_dropout = 0.1
        self.label_dropout = check_fraction("label_dropout", label_dropout, below_one=True)
        check_instance("eval_mode", eval_mode, bool, "a bool")
        self.uncond, self.eval_mode = uncond, eval_mode

    def draw_drop(
        self, batch_size: int, *, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor | None:
        """Which samples lose their condition: ``(B,)`` bool, each True with probability
        ``label_dropout`` (independently, as zhuyu-cs/MeanFlow; the JAX reference and FastGen
        drop a Binomial count at the front of the batch, the same law for a shuffled batch).

        Returns ``None`` when ``label_dropout == 0``, drawing nothing from the generator.
        """
        if self.label_dropout == 0.0:
            return None
        u = torch.rand(batch_size, device=device, generator=generator)
        return u < self.label_dropout

    def condition(self, cond: dict[str, Any], drop: Tensor | None) -> dict[str, Any]:
        """The student's conditioning: ``cond`` with the null condition in the dropped rows.

        Args:
            cond: the conditioning; each key ``uncond`` sets must be a ``(B, ...)`` tensor.
            drop: ``(B,)`` bool, True where the condition is dropped, or ``None`` (none).

        Returns:
            a new dict (``cond`` itself when ``drop`` is ``None``); each key ``uncond`` sets
            becomes ``where(drop, null, cond[key])``, of ``cond[key]``'s shape and dtype.
        """
        if drop is None:
            return cond
        null = _uncond_kwargs(self.uncond, cond)
        if null.keys() != cond.keys():
            raise ValueError(
                "label dropout replaces rows of cond, so uncond must set only keys cond has "
                f"(and a callable uncond must keep them all): cond has {sorted(cond)}, the "
                f"null condition {sorted(null)} (or pass label_dropout=0.0)"
            )
        out = dict(cond)
        for key, null_value in null.items():
            if null_value is not cond[key]:
                out[key] = _fill_rows(key, cond[key], null_value, drop)
        return out

    def null_condition(self, cond: dict[str, Any]) -> dict[str, Any]:
        """The conditioning of the guidance's unconditional pass ``u(z_t, t, t | null)``.

        A mapping ``uncond``'s number or tensor for a ``(B, ...)`` tensor condition is
        broadcast to that condition's shape and dtype (every row null, as a dropped row);
        any other value (a flag, a key ``cond`` lacks) is passed as given. A callable
        ``uncond``'s output is used as it is.
        """
        null = _uncond_kwargs(self.uncond, cond)
        if callable(self.uncond):
            return null
        for key, null_value in self.uncond.items():
            value = cond.get(key)
            if isinstance(value, Tensor) and value.ndim >= 1:
                null[key] = _fill_rows(key, value, null_value, None)
        return null

    def guided(self, t: Tensor, drop: Tensor | None) -> Tensor:
        """``(B,)`` bool: where eq. 21 applies (``t`` in the window and the condition kept)."""
        inside = (t >= self.t_min) & (t <= self.t_max)
        return inside if drop is None else inside & ~drop

    def __call__(
        self,
        v: Tensor,
        student: Callable[..., Tensor],
        z_t: Tensor,
        t: Tensor,
        cond: dict[str, Any],
        *,
        drop: Tensor | None = None,
    ) -> Tensor:
        """``v_tilde`` ``(B, ...)``: eq. 21 where :meth:`guided`, ``v`` exactly elsewhere.

        Args:
            v: the velocity ``(B, ...)`` at ``(z_t, t)`` (``eps - x`` or the teacher's).
            student: ``u(z, r, t, **cond)``; called without gradient at ``r = t``.
            z_t: states ``(B, ...)``.
            t: times ``(B,)``.
            cond: the samples' own conditioning (not yet dropped).
            drop: ``(B,)`` bool, True where the condition is dropped, or ``None``.
        """
        rest = 1.0 - self.omega - self.kappa
        with torch.no_grad(), _modes(student, self.eval_mode):
            mixed = self.omega * v
            if self.kappa != 0.0:
                mixed = mixed + self.kappa * student(z_t, t, t, **cond)
            if rest != 0.0:
                mixed = mixed + rest * student(z_t, t, t, **self.null_condition(cond))
            mask = self.guided(t, drop).reshape(-1, *([1] * (v.ndim - 1)))
            return torch.where(mask, mixed, v)

    def __repr__(self) -> str:
        return (
            f"MeanFlowGuidance(omega={self.omega}, kappa={self.kappa}, t_min={self.t_min}, "
            f"t_max={self.t_max}, label_dropout={self.label_dropout}, eval_mode={self.eval_mode})"
        )


def _fill_rows(key: str, value: object, null: object, drop: Tensor | None) -> Tensor:
    """``cond[key]`` with ``null`` in the rows where ``drop`` (in every row for ``None``), of
    ``value``'s shape and dtype; ``value`` must be a ``(B, ...)`` tensor and ``null`` a number
    or a tensor that broadcasts to it."""
    batch = "B" if drop is None else drop.shape[0]
    if not (isinstance(value, Tensor) and value.ndim >= 1 and batch in ("B", value.shape[0])):
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(
            f"label dropout replaces cond[{key!r}] per sample, so it must be a "
            f"({batch}, ...) tensor, got {got} (or pass label_dropout=0.0)"
        )
    if isinstance(null, Tensor):
        if null.ndim > 0:
            check_same_device(f"uncond[{key!r}]", null, value, f"cond[{key!r}]")
        if not _broadcasts(null.shape, value.shape):
            raise ValueError(
                f"uncond[{key!r}] of shape {tuple(null.shape)} does not broadcast to "
                f"cond[{key!r}] of shape {tuple(value.shape)}"
            )
        null = null.to(value.dtype)
    elif not isinstance(null, int | float):
        raise TypeError(f"uncond[{key!r}] must be a tensor or a number, got {type(null).__name__}")
    else:
        null = torch.full_like(value, null)
    if drop is None:
        drop = torch.ones(1, dtype=torch.bool, device=value.device)
    return torch.where(drop.reshape(-1, *([1] * (value.ndim - 1))), null, value)


def _broadcasts(shape: torch.Size, to: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, to) == to
    except RuntimeError:
        return False


@contextlib.contextmanager
def _modes(student: object, eval_mode: bool) -> Iterator[None]:
    """With ``eval_mode``, every submodule of an ``nn.Module`` in eval mode, each one's own
    mode restored on exit (a submodule kept in eval inside a training model stays so)."""
    if not (eval_mode and isinstance(student, nn.Module)):
        yield
        return
    modes = [(module, module.training) for module in student.modules()]
    student.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
