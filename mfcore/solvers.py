"""Teacher ODE solvers and few-step samplers.

Convention: ``t = 0`` data, ``t = 1`` noise; the probability-flow ODE is
``dz/dt = v(z, t)`` and sampling integrates it from ``t = 1`` down to ``t = 0``.

- :func:`odeint` integrates a teacher :class:`~mfcore.fields.VelocityField` over
  *per-sample* spans ``[t_start, t_end]`` (either direction) with a fixed-step method from
  :data:`ODE_METHODS` (the discrete MeanFlow target needs ``z_r`` from ``z_t`` for a different
  ``(r, t)`` in every sample).
- :func:`sample_teacher` runs the teacher along a sampling grid from 1 to 0.
- :func:`sample_meanflow` runs a student :class:`~mfcore.fields.MeanVelocityField` with the
  MeanFlow step ``z_r = z_t - (t - r) u(z_t, r, t)`` (Geng et al., arXiv 2505.13447, eq. 12).

Each method is a step function ``step(f, z, t0, t1, k1=None) -> dz`` with an ``order`` and a
``stages`` attribute; every method's first stage is ``k1 = f(z, t0)``, which a caller that
knows it already (the teacher's ``v`` at the start of a span) passes in. The
state and all time coefficients are kept in fp32 at least (fp64 stays fp64); the model is
called with the state cast to the input's dtype and with times in that compute dtype, and the
results are cast back to the input's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from mfcore._checks import (
    check_callable,
    check_cond,
    check_finite,
    check_grid,
    check_grid_steps,
    check_like,
    check_positive_int,
    check_real,
    check_tensor,
    check_time,
    lookup,
)
from mfcore.path import compute_dtype, expand_time
from mfcore.time import shift_time, shifted_grid, uniform_grid

__all__ = ["SOLVERS", "ODE_METHODS", "solver_order", "odeint", "sample_teacher", "sample_meanflow"]

_Field = Callable[[Tensor, Tensor], Tensor]
_Step = Callable[..., Tensor]  # step(f, z, t0, t1, k1=None) -> dz


# --------------------------------------------------------------------------- step functions
# f(z, t) is the velocity in the compute dtype; t0, t1 are (B,); each returns the increment dz.
# k1, when given, is f(z, t0) already known (the first stage of every method): the step uses
# it instead of evaluating the field there again.


def _euler(f: _Field, z: Tensor, t0: Tensor, t1: Tensor, k1: Tensor | None = None) -> Tensor:
    """Forward Euler: ``dz = h v(z, t0)``."""
    return expand_time(t1 - t0, z) * (f(z, t0) if k1 is None else k1)


def _heun(f: _Field, z: Tensor, t0: Tensor, t1: Tensor, k1: Tensor | None = None) -> Tensor:
    """Heun (explicit trapezoid): average of the slopes at both ends of an Euler step."""
    h = expand_time(t1 - t0, z)
    k1 = f(z, t0) if k1 is None else k1
    k2 = f(z + h * k1, t1)
    return 0.5 * h * (k1 + k2)


def _midpoint(f: _Field, z: Tensor, t0: Tensor, t1: Tensor, k1: Tensor | None = None) -> Tensor:
    """Explicit midpoint: the slope half an Euler step ahead."""
    h = expand_time(t1 - t0, z)
    k1 = f(z, t0) if k1 is None else k1
    return h * f(z + 0.5 * h * k1, 0.5 * (t0 + t1))


def _rk4(f: _Field, z: Tensor, t0: Tensor, t1: Tensor, k1: Tensor | None = None) -> Tensor:
    """Classical fourth-order Runge-Kutta."""
    h, tm = expand_time(t1 - t0, z), 0.5 * (t0 + t1)
    k1 = f(z, t0) if k1 is None else k1
    k2 = f(z + 0.5 * h * k1, tm)
    k3 = f(z + 0.5 * h * k2, tm)
    k4 = f(z + h * k3, t1)
    return h / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


_euler.order = 1  # type: ignore[attr-defined]
_heun.order = 2  # type: ignore[attr-defined]
_midpoint.order = 2  # type: ignore[attr-defined]
_rk4.order = 4  # type: ignore[attr-defined]
_euler.stages = 1  # type: ignore[attr-defined]
_heun.stages = 2  # type: ignore[attr-defined]
_midpoint.stages = 2  # type: ignore[attr-defined]
_rk4.stages = 4  # type: ignore[attr-defined]

#: The fixed-step methods by name (the registry), in order of accuracy: each a step
#: function ``step(f, z, t0, t1, k1=None) -> dz`` with an ``order`` attribute and a
#: ``stages`` attribute (field evaluations per step, the first one ``k1 = f(z, t0)``).
SOLVERS: Mapping[str, _Step] = MappingProxyType(
    {"euler": _euler, "heun": _heun, "midpoint": _midpoint, "rk4": _rk4}
)

#: Names of the fixed-step methods, in order of accuracy.
ODE_METHODS: tuple[str, ...] = tuple(SOLVERS)


def solver_order(method: str) -> int:
    """Order of accuracy of a method in :data:`ODE_METHODS` (global error ``O(h^order)``)."""
    return lookup("method", method, SOLVERS).order  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- validation


def _check_shift(shift: object) -> float | None:
    """``None`` or a finite real ``shift > 0``."""
    return None if shift is None else check_real("shift", shift, minimum=0.0, strict=True)


def _sampling_grid(
    steps: object, grid: object, shift: object, default_steps: int, ref: Tensor
) -> Tensor:
    """The ``(N + 1,)`` grid of a sampler, in the compute dtype of ``ref``."""
    cd = compute_dtype(ref.dtype)
    if grid is None:
        n = default_steps if steps is None else check_positive_int("steps", steps)
        if shift is None:
            return uniform_grid(n, device=ref.device, dtype=cd)
        return shifted_grid(n, shift=shift, device=ref.device, dtype=cd)  # type: ignore[arg-type]
    if shift is not None:
        raise ValueError("pass either grid or shift, not both (shift the grid yourself)")
    grid = check_grid(grid, ref, full_span=True)
    check_grid_steps(steps, grid)
    return grid.to(cd)


# --------------------------------------------------------------------------- integration core


def _field(
    fn: Callable[..., Tensor], name: str, dtype: torch.dtype, cond: dict[str, Any]
) -> _Field:
    """Wrap ``fn(z, t, **cond)``: call it on the state cast to ``dtype`` (the model's), check
    the output and upcast it to the compute dtype."""
    cd = compute_dtype(dtype)

    def f(z: Tensor, t: Tensor) -> Tensor:
        x = z.to(dtype)
        return check_like(f"the output of {name}", fn(x, t, **cond), x).to(cd)

    return f


def _advance(
    f: _Field,
    z: Tensor,
    times: Tensor,
    step: _Step,
    *,
    callback: Callable[[dict[str, Any]], None] | None = None,
    trajectory: list[Tensor] | None = None,
    k1: Tensor | None = None,
) -> Tensor:
    """Take ``len(times) - 1`` steps along per-sample ``times`` ``(N + 1, B)`` from ``z``;
    the end state in the compute dtype (fp32 at least), unchecked. ``k1``: the field at
    ``(z, times[0])`` if known (the first step's first stage, not evaluated again)."""
    state = z.to(compute_dtype(z.dtype))
    for i in range(times.shape[0] - 1):
        state = state + step(f, state, times[i], times[i + 1], k1 if i == 0 else None)
        if trajectory is not None or callback is not None:
            current = state.to(z.dtype)
            if trajectory is not None:
                trajectory.append(current)
            if callback is not None:
                callback({"step": i, "t": times[i], "t_next": times[i + 1], "z": current})
    return state


def _integrate(
    f: _Field,
    z: Tensor,
    times: Tensor,
    step: _Step,
    *,
    callback: Callable[[dict[str, Any]], None] | None = None,
    return_trajectory: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """:func:`_advance`, with the end state checked and cast to ``z``'s dtype."""
    trajectory = [z] if return_trajectory else None
    state = _advance(f, z, times, step, callback=callback, trajectory=trajectory)
    z_end = check_finite("the solution (did the model return NaN or inf?)", state.to(z.dtype))
    return z_end, None if trajectory is None else torch.stack(trajectory)


def solve_span(
    v_fn: Callable[..., Tensor],
    z: Tensor,
    t_start: Tensor,
    t_end: Tensor,
    *,
    steps: int,
    step: _Step,
    cond: dict[str, Any],
    model_dtype: torch.dtype,
    name: str = "the teacher",
    v_start: Tensor | None = None,
) -> Tensor:
    """The end state of :func:`odeint` in the compute dtype (fp32 at least), for callers that
    difference it (the discrete targets): a half-precision end state would round the secant
    away. ``z`` may be held at a higher precision than ``model_dtype``, the dtype ``v_fn``
    is called in; ``step`` is a step function of :data:`SOLVERS`; ``v_start``, if given, is
    ``v_fn`` at ``(z, t_start)`` (``(B, ...)``, any floating dtype), used as the first stage
    instead of evaluating it again: ``steps * step.stages - 1`` evaluations instead of
    ``steps * step.stages``. Internal: the arguments are trusted (validate at the public
    entry)."""
    cd = compute_dtype(model_dtype)
    times = _span_times(t_start, t_end, steps, None, cd)
    f = _field(v_fn, name, model_dtype, cond)
    k1 = None if v_start is None else v_start.to(cd)
    return _advance(f, z, times, step, k1=k1)


def span_rows(t_start: Tensor, t_end: Tensor, *, at_least_one: bool = False) -> Tensor:
    """Indices ``(K,)`` of the samples whose span is not empty (``t_start != t_end``).

    The discrete targets integrate only these rows (the others' answer is the velocity at the
    start, already known). ``K`` is the shape of the solve, so it is read to the host: one
    sync (``nonzero``). With ``at_least_one``, ``[0]`` when every span is empty (an empty
    span costs its evaluations but changes nothing), so the teacher is called the same number
    of times whatever the batch holds: every rank of a sharded teacher (FSDP2 gathers a
    block's weights at each call, on every rank together) takes part in every gather.
    """
    rows = torch.nonzero(t_start != t_end).squeeze(1)
    if rows.numel() or not at_least_one:
        return rows
    return torch.zeros(1, dtype=rows.dtype, device=rows.device)


def cond_rows(cond: dict[str, Any], rows: Tensor, batch: int) -> dict[str, Any]:
    """``cond`` at the samples ``rows``: each tensor whose first dimension is the batch
    (``batch``) is indexed there; anything else (flags, shared tensors such as position ids
    without a batch dimension) is passed as it is. A shared tensor whose first dimension
    happens to equal the batch would be indexed too: give it a leading dimension of 1."""
    out = {}
    for key, x in cond.items():
        per_sample = isinstance(x, Tensor) and x.ndim >= 1 and x.shape[0] == batch
        out[key] = x.index_select(0, rows) if per_sample else x
    return out


def _span_times(
    t_start: Tensor, t_end: Tensor, steps: int, shift: float | None, cd: torch.dtype
) -> Tensor:
    """Per-sample grids ``(steps + 1, B)`` from ``t_start`` to ``t_end`` in the compute dtype.

    Uniform in ``shift_time^{-1}(t)`` (plain ``t`` without a shift), so a span's grid is the
    restriction of the shifted sampling schedule; the endpoints are exactly the inputs.
    """
    start, end = t_start.to(cd), t_end.to(cd)
    a, b = start, end
    if shift is not None:
        a, b = shift_time(start, 1.0 / shift), shift_time(end, 1.0 / shift)
    g = (torch.arange(1, steps, dtype=torch.float64) / steps).to(device=a.device, dtype=cd)
    inner = ((1.0 - g[:, None]) * a + g[:, None] * b).clamp(0.0, 1.0)
    if shift is not None:
        inner = shift_time(inner, shift)
    return torch.cat([start[None], inner, end[None]])


# --------------------------------------------------------------------------- public API


def odeint(
    v_fn: Callable[..., Tensor],
    z: Tensor,
    t_start: Tensor,
    t_end: Tensor,
    steps: int,
    *,
    method: str = "euler",
    shift: float | None = None,
    return_trajectory: bool = False,
    cond: Mapping[str, Any] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Integrate ``dz/dt = v(z, t)`` from ``t_start`` to ``t_end``, per sample, in fixed steps.

    Sample ``b`` takes ``steps`` steps of ``method`` along its own grid from ``t_start[b]`` to
    ``t_end[b]``, in either direction; a sample with ``t_start[b] == t_end[b]`` stays where it
    is. The grid is uniform in ``t``, or with ``shift`` uniform in ``shift_time(t, 1 / shift)``:
    the restriction of :func:`mfcore.time.shifted_grid` to the span, so ``shift > 1`` puts the
    steps closer together near ``t = 1`` (noise) and ``shift < 1`` near ``t = 0`` (data). For
    FLUX.1's ``mu`` pass ``shift = exp(mu)``. Gradients are left on: call it under
    :func:`torch.no_grad` when the solution is a target.

    Args:
        v_fn: velocity field ``v(z, t, **cond) -> (B, ...)``.
        z: state ``(B, ...)`` at ``t_start``, floating.
        t_start: start times ``(B,)`` in ``[0, 1]``.
        t_end: end times ``(B,)`` in ``[0, 1]``.
        steps: number of steps ``N >= 1``.
        method: one of :data:`ODE_METHODS` (``"euler"``, ``"heun"``, ``"midpoint"``, ``"rk4"``).
        shift: optional static shift ``> 0`` of the grid (see above).
        return_trajectory: also return every state on the grid.
        cond: keyword arguments passed to ``v_fn`` unchanged.

    Returns:
        ``z_end`` ``(B, ...)`` at ``t_end`` in ``z``'s dtype, or ``(z_end, trajectory)`` with
        ``trajectory`` ``(N + 1, B, ...)`` (``trajectory[0] = z``, ``trajectory[-1] = z_end``).

    Example:
        >>> import torch
        >>> from mfcore import odeint
        >>> z0, t0, t1 = torch.ones(2, 1), torch.zeros(2), torch.tensor([1.0, 0.5])
        >>> odeint(lambda z, t: z, z0, t0, t1, 32, method="rk4").squeeze(1)  # e^t, per sample
        tensor([2.7183, 1.6487])
    """
    check_callable("v_fn", v_fn)
    check_tensor("z", z, ndim_min=1)
    check_time("t_start", t_start, z)
    check_time("t_end", t_end, z)
    steps = check_positive_int("steps", steps)
    step = lookup("method", method, SOLVERS)
    shift = _check_shift(shift)
    times = _span_times(t_start, t_end, steps, shift, compute_dtype(z.dtype))
    f = _field(v_fn, "v_fn", z.dtype, check_cond(cond))
    z_end, trajectory = _integrate(f, z, times, step, return_trajectory=return_trajectory)
    return z_end if trajectory is None else (z_end, trajectory)


def sample_teacher(
    v_fn: Callable[..., Tensor],
    noise: Tensor,
    steps: int | None = None,
    *,
    method: str = "euler",
    shift: float | None = None,
    grid: Tensor | None = None,
    cond: Mapping[str, Any] | None = None,
    return_trajectory: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sample with a teacher velocity field: integrate ``dz/dt = v`` from ``t = 1`` to ``t = 0``.

    Runs under :func:`torch.no_grad`. The grid is ``grid`` if given, else
    :func:`~mfcore.time.shifted_grid` with ``shift`` (``shift > 1``: steps closer together near
    noise, as SD3 and FLUX.1 sample; ``shift = exp(mu)`` for FLUX.1's ``mu``), else
    :func:`~mfcore.time.uniform_grid`.

    Args:
        v_fn: velocity field ``v(z, t, **cond) -> (B, ...)``.
        noise: starting state ``z_1`` ``(B, ...)``, floating.
        steps: number of steps ``N`` (default 50); with ``grid``, ``None`` or ``len(grid) - 1``.
        method: one of :data:`ODE_METHODS`.
        shift: optional static shift ``> 0`` of the uniform grid; not with ``grid``.
        grid: optional times ``(N + 1,)`` strictly decreasing from exactly 1 to exactly 0, on
            ``noise``'s device.
        cond: keyword arguments passed to ``v_fn`` unchanged.
        return_trajectory: also return every state on the grid.
        callback: called after each step with a dict ``step`` (int), ``t`` and ``t_next``
            (``(B,)``) and ``z`` (the new state).

    Returns:
        samples ``z_0`` ``(B, ...)`` in ``noise``'s dtype, or ``(z_0, trajectory)`` with
        ``trajectory`` ``(N + 1, B, ...)`` from ``noise`` to ``z_0``.

    Example:
        Straight paths to the point ``c`` have the velocity ``(z - c) / t``; Euler follows them
        exactly.

        >>> import torch
        >>> from mfcore import sample_teacher
        >>> c = torch.tensor([2.0, -1.0])
        >>> x = sample_teacher(lambda z, t: (z - c) / t[:, None], torch.randn(3, 2), 4)
        >>> torch.allclose(x, c.expand(3, 2), atol=1e-5)
        True
    """
    check_callable("v_fn", v_fn)
    check_callable("callback", callback, optional=True)
    check_tensor("noise", noise, ndim_min=1)
    step = lookup("method", method, SOLVERS)
    grid = _sampling_grid(steps, grid, _check_shift(shift), 50, noise)
    times = grid[:, None].repeat(1, noise.shape[0])
    f = _field(v_fn, "v_fn", noise.dtype, check_cond(cond))
    with torch.no_grad():
        z_end, trajectory = _integrate(
            f, noise, times, step, callback=callback, return_trajectory=return_trajectory
        )
    return z_end if trajectory is None else (z_end, trajectory)


def sample_meanflow(
    u_fn: Callable[..., Tensor],
    noise: Tensor,
    steps: int | None = None,
    *,
    grid: Tensor | None = None,
    cond: Mapping[str, Any] | None = None,
    return_trajectory: bool = False,
    enable_grad: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Few-step MeanFlow sampling: ``z_r = z_t - (t - r) u(z_t, r, t)`` along a grid.

    One step per grid interval ``[t_{i+1}, t_i]`` (MeanFlow, arXiv 2505.13447, eq. 12; with an
    exact ``u`` every grid lands exactly on the ODE's solution). Runs under
    :func:`torch.no_grad` unless ``enable_grad`` (e.g. to back-propagate through the samples).

    Args:
        u_fn: average-velocity field ``u(z, r, t, **cond) -> (B, ...)``.
        noise: starting state ``z_1`` ``(B, ...)``, floating.
        steps: number of steps ``N`` on a uniform grid (default 1); with ``grid``, ``None`` or
            ``len(grid) - 1``.
        grid: optional times ``(N + 1,)`` strictly decreasing from exactly 1 to exactly 0, on
            ``noise``'s device.
        cond: keyword arguments passed to ``u_fn`` unchanged.
        return_trajectory: also return every state on the grid.
        enable_grad: run with gradients enabled instead of under :func:`torch.no_grad`.
        callback: called after each step with a dict ``step`` (int), ``t`` and ``t_next``
            (``(B,)``), ``z`` (the new state) and ``u`` (the average velocity used).

    Returns:
        samples ``z_0`` ``(B, ...)`` in ``noise``'s dtype, or ``(z_0, trajectory)`` with
        ``trajectory`` ``(N + 1, B, ...)`` from ``noise`` to ``z_0``.

    Example:
        Straight paths to the point ``c``: the average velocity is ``(z - c) / t`` over any
        interval, and one step lands on ``c``.

        >>> import torch
        >>> from mfcore import sample_meanflow
        >>> c = torch.tensor([2.0, -1.0])
        >>> x = sample_meanflow(lambda z, r, t: (z - c) / t[:, None], torch.randn(3, 2), steps=1)
        >>> torch.allclose(x, c.expand(3, 2), atol=1e-6)
        True
    """
    check_callable("u_fn", u_fn)
    check_callable("callback", callback, optional=True)
    check_tensor("noise", noise, ndim_min=1)
    grid = _sampling_grid(steps, grid, None, 1, noise)
    cond = check_cond(cond)
    with torch.enable_grad() if enable_grad else torch.no_grad():
        z_end, trajectory = meanflow_path(
            u_fn, noise, grid, cond, callback=callback, return_trajectory=return_trajectory
        )
    check_finite("the samples (did u_fn return NaN or inf?)", z_end)
    return z_end if trajectory is None else (z_end, trajectory)


def meanflow_path(
    u_fn: Callable[..., Tensor],
    noise: Tensor,
    grid: Tensor,
    cond: dict[str, Any],
    *,
    callback: Callable[[dict[str, Any]], None] | None = None,
    return_trajectory: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The loop of :func:`sample_meanflow` along ``grid`` (in the compute dtype), in the
    current grad mode: ``(z_end, trajectory or None)``, not checked for finiteness.
    Internal: the arguments are trusted (validate at the public entry)."""
    batch, state = noise.shape[0], noise.to(grid.dtype)
    trajectory = [noise] if return_trajectory else None
    for i in range(grid.shape[0] - 1):
        t, r = grid[i].repeat(batch), grid[i + 1].repeat(batch)
        x = state.to(noise.dtype)
        u = check_like("the output of u_fn", u_fn(x, r, t, **cond), x)
        state = state - expand_time(t - r, state) * u.to(grid.dtype)
        current = state.to(noise.dtype)
        if trajectory is not None:
            trajectory.append(current)
        if callback is not None:
            callback({"step": i, "t": t, "t_next": r, "z": current, "u": u})
    return state.to(noise.dtype), None if trajectory is None else torch.stack(trajectory)
