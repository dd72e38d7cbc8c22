"""Nested training state <-> one safetensors file plus JSON, with no pickle (private).

Optimiser states, RNG states and the warm-up switch are nested dicts and lists of tensors
and plain values. :func:`save_state` stores every tensor in a safetensors file and the
structure (with typed dict keys, tuples, ints and floats) in a JSON file next to it, so
:func:`load_state` rebuilds the object exactly and never unpickles anything.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from mfcore.adapters._durable import read_json, sync_file, write_json
from mfcore.adapters._files import check_file

_TENSOR, _DICT, _TUPLE = "__tensor__", "__dict__", "__tuple__"
_SCALARS = (bool, int, float, str, type(None))


def _encode(obj: Any, tensors: dict[str, Tensor], path: str) -> Any:
    if isinstance(obj, Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: name}
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, _SCALARS):
                raise TypeError(f"state key {k!r} at {path} is not a plain value")
            items.append([k, _encode(v, tensors, f"{path}.{k}")])
        return {_DICT: items}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, _SCALARS):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} without pickle")


def _decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(_decode(v, tensors) for v in obj[_TUPLE])
        return {k: _decode(v, tensors) for k, v in obj[_DICT]}
    return obj


def save_state(state: Any, stem: str | os.PathLike) -> None:
    """Write ``state`` to ``<stem>.safetensors`` and ``<stem>.json``, both synced to the disk
    (the JSON last: a folder holding it holds the tensors)."""
    tensors: dict[str, Tensor] = {}
    skeleton = _encode(state, tensors, "state")
    save_file(tensors, f"{stem}.safetensors")
    sync_file(f"{stem}.safetensors")
    write_json(f"{stem}.json", skeleton, allow_nan=True)  # read back by Python only


@contextlib.contextmanager
def open_tensors(
    path: str | os.PathLike, what: str = "data file", device: str = "cpu"
) -> Iterator[Any]:
    """``safe_open(path)`` (memory-mapped); a missing file raises ``FileNotFoundError`` and a
    folder, an empty, truncated or corrupt file ``ValueError``, each naming it as ``what``."""
    path = check_file(path, what)
    try:
        handle = safe_open(path, framework="pt", device=device)
    except SafetensorError as err:
        raise ValueError(f"{what} {path} is truncated or corrupt ({err})") from None
    with handle as f:
        yield f


def read_tensors(
    path: str | os.PathLike, device: str = "cpu", what: str = "checkpoint file"
) -> dict[str, Tensor]:
    """The tensors of a safetensors file, with :func:`open_tensors`' named errors."""
    with open_tensors(path, what, device) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def load_state(stem: str | os.PathLike) -> Any:
    """Read what :func:`save_state` wrote (tensors on the CPU)."""
    tensors = read_tensors(f"{stem}.safetensors")
    skeleton = read_json(f"{stem}.json", "checkpoint file")
    try:
        return _decode(skeleton, tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"checkpoint file {stem}.json is truncated or corrupt ({err})") from None


def check_entries(state: Any, keys: Iterable[str], where: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming ``where`` and the entries of ``keys`` that the loaded
    checkpoint state ``state`` lacks."""
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"checkpoint {where} lacks the entries {missing}")
