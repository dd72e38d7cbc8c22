"""Declared shapes of a family's condition tensors, checked by one function (private).

A family declares each condition tensor of one prompt as a :class:`Shape`: its dimensions,
each an ``int``, a symbol in upper case (``"B"`` is the batch of ``z``; any other, such as
``"L"``, is bound by the first tensor that has it, so every tensor that names it agrees) or
the name of an entry of the model's config in lower case (``"joint_attention_dim"``; a
tensor whose entry is None is an input the model lacks, and is ignored); the kind of values
it holds; and whether a call must give it. Calls (:func:`check_conditions`) and data folders
(:func:`data_problems`, per-sample shapes, the batch ``N`` dropped) are checked against the
same declaration, and every problem is reported at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mfcore._checks import check_tensor

__all__ = ["Shape", "check_conditions", "data_problems", "config_value"]


@dataclass(frozen=True)
class Shape:
    """One condition tensor: ``dims`` (the batch first), ``values`` ``"float"``, ``"int"``
    (integers, not bool) or ``"any"``, and whether every call must give it."""

    dims: tuple[int | str, ...]
    values: str = "float"
    required: bool = True


#: What each kind of values is called, and whether a tensor's dtype holds it.
_VALUES = {
    "float": ("floating-point values", lambda x: x.is_floating_point()),
    "int": ("integers", lambda x: not x.is_floating_point() and x.dtype != torch.bool),
    "any": ("", lambda x: True),
}


def _text(items: tuple | list) -> str:
    return "(" + ", ".join(map(str, items)) + ("," if len(items) == 1 else "") + ")"


def config_value(config: Any, key: str) -> Any:
    """Entry ``key`` of a model config, a mapping or an object with attributes."""
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key)


def _present(shape: Shape, config: Any) -> bool:
    """Whether the model takes this tensor (none of its config widths is None)."""
    names = [d for d in shape.dims if isinstance(d, str) and not d.isupper()]
    return all(config_value(config, d) is not None for d in names)


def _mismatch(dims: tuple, got: tuple, sizes: dict[str, int], config: Any) -> list | None:
    """``dims`` with every known size filled in if ``got`` does not fit them; else None, and
    the free symbols are bound to ``got``'s sizes in ``sizes``."""
    want = [d if isinstance(d, int) else sizes.get(d) if d.isupper() else config_value(config, d)
            for d in dims]  # fmt: skip
    if len(got) == len(dims) and all(w in (None, g) for w, g in zip(want, got, strict=True)):
        sizes.update({d: g for d, g in zip(dims, got, strict=True) if str(d).isupper()})
        return None
    return [d if w is None else w for d, w in zip(dims, want, strict=True)]


def check_conditions(
    spec: Mapping[str, Shape],
    cond: Mapping[str, Any],
    z: Tensor,
    config: Any,
    *,
    tag: str,
    label: str,
    missing: type[Exception] = TypeError,
    validate: bool = True,
) -> dict[str, Tensor]:
    """The tensors of ``spec`` that one prompt's ``cond`` holds (``tag`` ``""``, or
    ``"negative_"`` for the negative prompt's ``negative_<name>``), keyed by their names in
    ``spec``, once each fits: its dims with ``B = z.shape[0]``, its kind of values, ``z``'s
    device. ``validate=False`` picks them without a check (arguments checked already).

    Raises:
        TypeError: a value is not a tensor, or a required one is missing (``missing``;
            always ``ValueError`` for the negative prompt, which two-pass guidance needs).
        ValueError: listing every tensor of the wrong shape, dtype or device.
    """
    if not validate:
        picked = {k: cond.get(tag + k) for k, s in spec.items() if _present(s, config)}
        return {k: x for k, x in picked.items() if x is not None}
    absent = [tag + k for k, s in spec.items() if s.required and cond.get(tag + k) is None]
    if absent:
        why = "two-pass guidance (true_cfg_scale > 1) needs" if tag else "a call needs"
        error = ValueError if tag else missing
        raise error(f"{why} {', '.join(absent)} for a {label} model")
    sizes, problems, out = {"B": z.shape[0]}, [], {}
    for key, shape in spec.items():
        name, x = tag + key, cond.get(tag + key)
        if x is None or not _present(shape, config):
            continue
        check_tensor(name, x, floating=False)
        kind, holds = _VALUES[shape.values]
        if not holds(x):
            problems.append(f"{name} must hold {kind}, got {x.dtype}")
        if (want := _mismatch(shape.dims, tuple(x.shape), sizes, config)) is not None:
            problems.append(f"{name} must have shape {_text(want)}, got {tuple(x.shape)}")
        if x.device != z.device:
            problems.append(f"{name} is on {x.device} but z is on {z.device}")
        out[key] = x
    if problems:
        raise ValueError("; ".join(problems))
    return out


def data_problems(
    spec: Mapping[str, Shape], shapes: Mapping[str, tuple[int, ...]], config: Any
) -> list[str]:
    """What is wrong with a data folder's per-sample ``shapes`` (the prompt's and the
    negative prompt's tensors of ``spec`` it holds) for a model of ``config``."""
    problems = []
    for tag in ("", "negative_"):
        sizes: dict[str, int] = {}
        for key, shape in spec.items():
            got = shapes.get(tag + key)
            if got is None or not _present(shape, config):
                continue
            if (want := _mismatch(shape.dims[1:], got, sizes, config)) is not None:
                want_n, got_n = _text(["N", *want]), _text(["N", *got])
                problems.append(f"{tag}{key} must be {want_n}, got {got_n}")
    return problems
