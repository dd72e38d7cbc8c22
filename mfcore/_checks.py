"""Input validation: one validator per kind of check, used by every public entry (private).

Public functions and constructors check their arguments here, once, so errors name the
argument and what was expected instead of surfacing as a broadcast error (or a silent
broadcast) deep inside a model; the internals they call trust them (torchdiffeq's
``_check_inputs`` pattern).

Value checks on tensors cost a host sync (``bool(tensor)``). Each validator reads the host
once on the happy path, every condition folded into one boolean; only when that fails does
it look again, to say which condition broke.
"""

from __future__ import annotations

import argparse
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

_T = TypeVar("_T")

# --------------------------------------------------------------------------- python values


def check_positive_int(name: str, n: object, *, minimum: int = 1) -> int:
    """Raise unless ``n`` is an int (not a bool) ``>= minimum``."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n}")
    return n


#: The range of torch's 64-bit integers (seeds, counts): a Python int past it overflows there.
INT64_RANGE = (-(2**63), 2**63 - 1)


def check_int64(name: str, n: object) -> int:
    """Raise unless ``n`` is an int (not a bool) that fits in int64 (torch's seeds and counts)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    low, high = INT64_RANGE
    if not low <= n <= high:
        raise ValueError(f"{name} must fit in int64 [{low}, {high}], got {n}")
    return n


def cli_int(text: str) -> int:
    """An argparse ``type``: an integer flag that fits in int64 (an overflow is a usage error
    naming the flag, not a library exception at its first use)."""
    try:
        return check_int64("the value", int(text))
    except ValueError as err:
        what = str(err) if "int64" in str(err) else f"invalid int value: {text!r}"
        raise argparse.ArgumentTypeError(what) from None


def check_real(
    name: str, value: object, *, minimum: float | None = None, strict: bool = False
) -> float:
    """``value`` as a float; raise unless it is a finite real number (not a bool), and
    ``>= minimum`` (``> minimum`` when ``strict``) when a minimum is given."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if minimum is None:
        low_ok, bound = True, ""
    else:
        low_ok = value > minimum if strict else value >= minimum
        bound = f" and > {minimum}" if strict else f" and >= {minimum}"
    if not (math.isfinite(value) and low_ok):
        raise ValueError(f"{name} must be finite{bound}, got {value!r}")
    return float(value)


def check_bandwidths(bandwidths: object) -> tuple[float, ...]:
    """``bandwidths`` as a non-empty tuple of positive floats (a sequence or a 1-D tensor of
    kernel bandwidths); ``TypeError``/``ValueError`` naming ``bandwidths`` otherwise."""
    if isinstance(bandwidths, Tensor):
        bandwidths = bandwidths.flatten().tolist()
    if isinstance(bandwidths, str) or not isinstance(bandwidths, Sequence):
        raise TypeError(
            f"bandwidths must be a sequence of positive floats, got {type(bandwidths).__name__}"
        )
    if not bandwidths:
        raise ValueError("bandwidths must not be empty")
    return tuple(check_real("bandwidths", h, minimum=0.0, strict=True) for h in bandwidths)


def check_fraction(name: str, value: object, *, below_one: bool = False) -> float:
    """``value`` as a float in ``[0, 1]`` (``[0, 1)`` when ``below_one``)."""
    x = check_real(name, value)
    if not (0.0 <= x and (x < 1.0 if below_one else x <= 1.0)):
        raise ValueError(f"{name} must lie in [0, 1{')' if below_one else ']'}, got {value!r}")
    return x


def check_choice(name: str, value: object, choices: Mapping | tuple | list) -> str:
    """Raise unless ``value`` is one of ``choices`` (listing the valid ones)."""
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {valid}; got {value!r}")
    return value


def lookup(name: str, value: object, registry: Mapping[str, _T]) -> _T:
    """The object a registry holds under the name ``value`` (an unknown name lists the
    valid ones)."""
    return registry[check_choice(name, value, registry)]


def check_callable(name: str, fn: object, *, optional: bool = False) -> None:
    """Raise unless ``fn`` is callable (or ``None`` when ``optional``)."""
    if optional and fn is None:
        return
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}")


def check_cond(cond: object) -> dict[str, Any]:
    """Conditioning as a new dict of keyword arguments (``None`` means no conditioning)."""
    if cond is None:
        return {}
    if not isinstance(cond, Mapping):
        raise TypeError(
            f"cond must be a mapping of keyword arguments or None, got {type(cond).__name__}"
        )
    return dict(cond)


def check_instance(
    name: str,
    value: object,
    kind: type | tuple[type, ...],
    what: str,
    *,
    optional: bool = False,
) -> None:
    """Raise ``TypeError`` unless ``value`` is a ``kind`` (described as ``what``), or
    ``None`` when ``optional``."""
    if not isinstance(value, kind) and not (optional and value is None):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")


def check_state(owner: str, state: object, keys: Iterable[str]) -> Mapping[str, Any]:
    """Raise unless ``state`` is a mapping that holds ``keys``: a saved state of ``owner``
    (``TypeError`` for another type, one ``KeyError`` naming every missing key)."""
    check_instance(f"the state of {owner}", state, Mapping, "a mapping (a state_dict)")
    assert isinstance(state, Mapping)
    missing = [repr(k) for k in keys if k not in state]
    if missing:
        raise KeyError(f"{owner} state is missing {', '.join(missing)}")
    return state


def check_same_device(name: str, x: Tensor, ref: Tensor, ref_name: str) -> None:
    """Raise ``ValueError`` unless ``x`` is on the device of ``ref``."""
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


# --------------------------------------------------------------------------- weightings


def _positional_arity(fn: Callable[..., Any]) -> int | None:
    """How many positional arguments ``fn`` takes (``None``: any number, or unknown)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = [p.kind for p in params]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(kind in positional for kind in kinds)


def check_weighting(
    weighting: object,
    *,
    old_arity: int | None = None,
    old_form: str = "",
    adapt: Callable[[Callable[..., Tensor]], Callable[[Tensor, Tensor, Tensor], Tensor]]
    | None = None,
) -> Any:
    """``None`` or a :class:`~mfcore.fields.Weighting` ``w(sq_err, r, t) -> (B,)``.

    A callable that takes exactly ``old_arity`` positional arguments is the signature this
    role had before (``old_form``): it still works, through ``adapt``, with a
    ``FutureWarning``.
    """
    check_callable("weighting", weighting, optional=True)
    if weighting is None or old_arity is None or _positional_arity(weighting) != old_arity:
        return weighting
    assert adapt is not None
    warnings.warn(
        f"a weighting {old_form} is deprecated: every weighting is now called as "
        "weighting(sq_err, r, t) -> (B,) (mfcore.fields.Weighting); this one is adapted",
        FutureWarning,
        stacklevel=3,
    )
    return adapt(weighting)  # type: ignore[arg-type]


def check_weights(weight: object, sq_err: Tensor) -> Tensor:
    """A weighting's output: one weight per sample, ``(B,)`` like ``sq_err`` (a ``(B, 1)``
    weight would broadcast the mean over a ``B x B`` matrix)."""
    if not isinstance(weight, Tensor) or weight.shape != sq_err.shape:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weighting must return a ({sq_err.shape[0]},) tensor, got {got}")
    return weight


# --------------------------------------------------------------------------- tensors


def check_tensor(name: str, x: object, *, floating: bool = True, ndim_min: int = 0) -> Tensor:
    """Raise unless ``x`` is a tensor (floating point when ``floating``) of ``ndim >= ndim_min``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if x.ndim < ndim_min:
        raise ValueError(
            f"{name} must have at least {ndim_min} dimensions, got shape {tuple(x.shape)}"
        )
    return x


def check_batch(name: str, x: object) -> Tensor:
    """Raise unless ``x`` is a floating batch ``(B, ...)``: ``B >= 1`` samples of at least one
    feature dimension (a ``(B,)`` tensor is ``B`` scalars: reshape it to ``(B, 1)``)."""
    x = check_tensor(name, x)
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have shape (B, ...) with at least one dimension per sample, got "
            f"{tuple(x.shape)} (reshape scalar samples to (B, 1))"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}): B must be >= 1")
    return x


def check_student_output(u: object) -> Tensor:
    """Raise unless the student's output is a floating tensor: an integer ``u`` has no
    gradient (the loss would not train) and a zero du/dt."""
    if isinstance(u, Tensor) and not u.is_floating_point():
        raise TypeError(
            f"u_fn (the student) must return a floating-point tensor, got {u.dtype}: the "
            "loss would have no gradient and du/dt would be 0"
        )
    return check_tensor("the output of u_fn", u)


def check_like(name: str, x: object, ref: Tensor, ref_name: str = "z") -> Tensor:
    """Raise unless ``x`` is a floating tensor with the shape and device of ``ref``."""
    x = check_tensor(name, x)
    if x.shape != ref.shape:
        raise ValueError(
            f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}"
        )
    check_same_device(name, x, ref, ref_name)
    return x


def check_shape(name: str, x: object, shape: tuple[int, ...]) -> Tensor:
    """Raise unless ``x`` is a floating tensor of exactly ``shape``."""
    x = check_tensor(name, x)
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    return x


def check_values_finite(name: str, x: Tensor) -> Tensor:
    """Raise ``ValueError`` if an input tensor holds a NaN or an infinity (one sync)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite (it holds a NaN or an infinity)")
    return x


def check_finite(
    name: str, x: Tensor, suspects: Callable[[], Iterable[tuple[str, object]]] | None = None
) -> Tensor:
    """Raise ``FloatingPointError`` if a computed result holds a NaN or an infinity (instead
    of passing it on quietly), naming the first of ``suspects()`` (looked at only then, see
    :func:`non_finite_cause`) that is not finite; one sync."""
    if not bool(torch.isfinite(x).all()):
        cause = non_finite_cause(suspects()) if suspects is not None else None
        first = f": {cause} holds a NaN or an infinity" if cause is not None else ""
        raise FloatingPointError(f"{name} is not finite (NaN or inf){first}")
    return x


def _bad_rows(x: Tensor) -> str:
    rows = (~torch.isfinite(x.detach())).reshape(x.shape[0], -1).any(1).nonzero().flatten()
    shown = ", ".join(str(i) for i in rows[:8].tolist())
    return f"sample{'s' if len(rows) > 1 else ''} {shown}{', ...' if len(rows) > 8 else ''}"


def non_finite_cause(suspects: Iterable[tuple[str, object]]) -> str | None:
    """The first of ``(description, value)`` whose value holds a NaN or an infinity, with
    where: a tensor ``(B, ...)`` (its bad samples) or an ``nn.Module`` (its first bad
    parameter; of a sharded one, this rank's shard); ``None`` when every one is finite. Only
    for the error path of a non-finite result: it reads the host once per value."""
    for what, value in suspects:
        if isinstance(value, nn.Module):
            for name, p in value.named_parameters():
                p = p.to_local() if hasattr(p, "to_local") else p  # a DTensor: this rank's shard
                if p.is_floating_point() and not bool(torch.isfinite(p.detach()).all()):
                    return f"{what} ({name})"
        elif isinstance(value, Tensor) and value.is_floating_point() and value.ndim >= 1:
            if not bool(torch.isfinite(value.detach()).all()):
                return f"{what} ({_bad_rows(value)})"
    return None


def non_finite_loss(
    per_sample: Tensor, suspects: Iterable[tuple[str, object]], step: int | None
) -> FloatingPointError:
    """The error of a non-finite per-sample loss ``(B,)``: which input or intermediate was not
    finite first (:func:`non_finite_cause`), how many samples, and the step."""
    bad = int((~torch.isfinite(per_sample)).sum())
    where = f" at step {step}" if step is not None else ""
    cause = non_finite_cause(suspects)
    first = (
        f"{cause} holds a NaN or an infinity"
        if cause is not None
        else "every input, weight and intermediate is finite, but the squared error "
        "overflowed (check the learning rate and the target's scale)"
    )
    return FloatingPointError(
        f"non-finite loss in {bad} of {per_sample.numel()} samples{where}: {first}"
    )


def check_dtype(dtype: object) -> torch.dtype:
    """Raise unless ``dtype`` is a floating-point torch dtype."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    return dtype


def check_device(device: object) -> torch.device:
    """Resolve ``device`` (``None`` means torch's default device)."""
    if device is None:
        return torch.get_default_device()
    if not isinstance(device, str | torch.device):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} is not a valid torch device") from err


def check_generator(generator: object, device: torch.device) -> torch.Generator | None:
    """Raise unless ``generator`` is ``None`` or a :class:`torch.Generator` on ``device``."""
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    gen = generator.device
    if gen.type != device.type or (
        device.index is not None and gen.index is not None and gen.index != device.index
    ):
        raise ValueError(f"generator is on {gen} but the times are drawn on {device}")
    return generator


# --------------------------------------------------------------------------- times


def _in_unit(t: Tensor) -> Tensor:
    """0-dim bool: every value in ``[0, 1]`` (a NaN or an infinity fails a comparison)."""
    return ((t >= 0) & (t <= 1)).all()


def _unit_error(name: str, t: Tensor) -> ValueError:
    """Why ``t`` failed :func:`_in_unit` (the error path: it may read the host again)."""
    if not bool(torch.isfinite(t).all()):
        return ValueError(f"{name} must be finite")
    return ValueError(
        f"{name} must lie in [0, 1] (t = 0 data, t = 1 noise); "
        f"got values in [{t.min().item():.4g}, {t.max().item():.4g}]"
    )


def check_unit(name: str, t: object) -> Tensor:
    """Raise unless ``t`` is a floating tensor (any shape) with finite values in ``[0, 1]``
    (one sync; a meta tensor's values are not checked)."""
    t = check_tensor(name, t)
    if t.device.type != "meta" and not bool(_in_unit(t)):
        raise _unit_error(name, t)
    return t


def _check_time_meta(name: str, t: object, z: Tensor | None, batch: int | None) -> Tensor:
    """The sync-free part of :func:`check_time`: type, shape, batch and device."""
    t = check_tensor(name, t)
    if t.ndim != 1:
        raise ValueError(f"{name} must have shape (B,), got {tuple(t.shape)}")
    if z is not None:
        if z.ndim < 1:
            raise ValueError(f"z must have a batch dimension, got shape {tuple(z.shape)}")
        batch = z.shape[0]
        if t.device != z.device:
            raise ValueError(f"{name} is on {t.device} but z is on {z.device}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(
            f"{name} must have shape ({batch},) to match the batch, got {tuple(t.shape)}"
        )
    return t


def check_time(
    name: str, t: object, z: Tensor | None = None, *, batch: int | None = None
) -> Tensor:
    """Check a time tensor: floating, shape ``(B,)``, finite, in ``[0, 1]`` (one sync).

    Args:
        name: the argument's name, for the error message.
        t: the candidate time tensor.
        z: optional state of shape ``(B, ...)``; ``t`` must match its batch size and device.
        batch: optional batch size to match when there is no ``z``.

    Returns:
        ``t`` unchanged.
    """
    return check_unit(name, _check_time_meta(name, t, z, batch))


def check_interval(
    r: object,
    t: object,
    z: Tensor | None = None,
    *,
    names: tuple[str, str] = ("r", "t"),
    strict: bool = False,
    batch: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Check a pair of ``(B,)`` times (see :func:`check_time`) with ``r <= t`` elementwise
    (``r < t`` when ``strict``); one sync for all of it.

    Args:
        r, t: the lower and upper times.
        z: optional state ``(B, ...)`` whose batch size and device both must match.
        names: the two arguments' names, for the error messages.
        strict: require ``r < t``.
        batch: optional batch size to match when there is no ``z``.

    Returns:
        ``(r, t)`` unchanged.
    """
    lo, hi = names
    t = _check_time_meta(hi, t, z, batch)
    r = _check_time_meta(lo, r, z, t.shape[0])
    if r.device != t.device:
        raise ValueError(f"{lo} is on {r.device} but {hi} is on {t.device}")
    if t.device.type == "meta":
        return r, t
    ordered = (r < t) if strict else (r <= t)
    if not bool(_in_unit(t) & _in_unit(r) & ordered.all()):
        check_unit(hi, t)
        check_unit(lo, r)
        raise ValueError(
            f"{lo} must satisfy {lo} {'<' if strict else '<='} {hi} elementwise "
            f"(the interval [{lo}, {hi}] runs backwards{' or is empty' if strict else ''})"
        )
    return r, t


def check_grid(grid: object, ref: Tensor | None = None, *, full_span: bool) -> Tensor:
    """Check a sampling grid: ``(N + 1,)``, ``N >= 1``, on ``ref``'s device (when given),
    finite, in ``[0, 1]`` and strictly decreasing (sampling runs from noise towards data);
    with ``full_span`` it must also run from exactly 1 to exactly 0. One sync. Returns
    ``grid``."""
    grid = check_tensor("grid", grid)
    if grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(f"grid must have shape (N + 1,) with N >= 1, got {tuple(grid.shape)}")
    if ref is not None and grid.device != ref.device:
        raise ValueError(f"grid is on {grid.device} but noise is on {ref.device}")
    ok = _in_unit(grid) & (grid[1:] < grid[:-1]).all()
    if full_span:
        ok = ok & (grid[0] == 1) & (grid[-1] == 0)
    if bool(ok):
        return grid
    if not bool(_in_unit(grid)):
        raise ValueError("grid must be finite and lie in [0, 1]")
    if full_span and (grid[0].item() != 1.0 or grid[-1].item() != 0.0):
        raise ValueError(
            f"grid must run from exactly 1 (noise) to exactly 0 (data), "
            f"got {grid[0].item():.6g} to {grid[-1].item():.6g}"
        )
    raise ValueError("grid must be strictly decreasing (sampling runs from 1 towards 0)")


def check_grid_steps(steps: object, grid: Tensor) -> None:
    """Raise unless ``steps`` is ``None`` or the number of steps of a checked ``grid``."""
    if steps is not None and check_positive_int("steps", steps) != grid.shape[0] - 1:
        raise ValueError(
            f"steps={steps} does not match the grid's {grid.shape[0] - 1} steps; "
            "pass steps=None with a grid"
        )
