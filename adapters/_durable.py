"""Writes that a kill or a power cut cannot leave half done (private).

A file is written under a temporary name, flushed to the disk (``fsync``) and renamed over
its final name, and the folder holding it is synced too, so the name points at the old
content or the whole new one. A folder (a checkpoint, an exported student) is written
whole under a temporary name, synced, and swapped in by :func:`replace_folder`, which keeps
the old folder as ``<name>.old`` until the new one is in place: :func:`whole_folders`
finds the old or the new one whatever step a kill interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

from mfcore.adapters._files import check_file

__all__ = ["sync_file", "sync_tree", "write_atomic", "write_json", "replace_folder"]
__all__ += ["whole_folders", "read_json"]


def _sync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_file(path: str | os.PathLike) -> None:
    """Flush a written file's content to the disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def sync_tree(folder: str | os.PathLike) -> None:
    """Flush every file and folder under ``folder`` (and ``folder`` itself) to the disk."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            sync_file(os.path.join(root, name))
        for name in dirs:
            _sync_dir(os.path.join(root, name))
    _sync_dir(folder)


def write_atomic(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp)`` to write a temporary file, sync it and rename it to ``path``."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    write(tmp)
    sync_file(tmp)
    os.replace(tmp, path)
    _sync_dir(os.path.dirname(os.path.abspath(path)))


def write_json(path: str | os.PathLike, obj: Any, **dump: Any) -> None:
    """:func:`write_atomic` of ``obj`` as JSON; strict (``NaN``/``Infinity`` refused) unless
    ``allow_nan=True`` is among ``dump``, :func:`json.dumps`' keywords."""
    text = json.dumps(obj, **({"allow_nan": False} | dump))

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, write)


def replace_folder(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the written folder ``tmp`` in place of ``final``: sync ``tmp``, move ``final`` to
    ``<final>.old``, rename ``tmp`` to ``final``, sync the parent, then delete the old one.

    A kill at any point leaves ``final`` or ``<final>.old`` whole (:func:`whole_folders`).
    """
    tmp, final = os.fspath(tmp), os.fspath(final)
    old = final + ".old"
    sync_tree(tmp)
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)  # a leftover of an earlier interrupted swap
        os.replace(final, old)
    os.replace(tmp, final)
    _sync_dir(os.path.dirname(os.path.abspath(final)))
    shutil.rmtree(old, ignore_errors=True)


def whole_folders(final: str | os.PathLike) -> list[str]:
    """The whole folders a :func:`replace_folder` into ``final`` may have left, newest first:
    ``final`` and/or ``<final>.old``."""
    final = os.fspath(final)
    return [p for p in (final, final + ".old") if os.path.isdir(p)]


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """A JSON file's content; :func:`~mfcore.adapters._files.check_file`'s errors if it is
    missing or a folder, ``ValueError`` naming it if it is not JSON (or not UTF-8)."""
    path = check_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what} {path} is not JSON ({err})") from None
