"""The checkpoint folders of a ``mfcore-distill`` run: their names, their order, pruning,
and the data fingerprint a checkpoint records.

A run keeps ``<output>/checkpoints/step-XXXXXXX/`` folders. Only names ``step-<digits>``
count, ordered by the number (not as text: ``step-10000000`` is newer than
``step-9999999``); anything else in the folder (``step-best``, a ``.tmp`` being written,
``.old`` or ``.unverified`` ones) is the user's or a leftover, never resumed and never
deleted.
"""

from __future__ import annotations

import os
import re
import shutil

__all__ = ["checkpoint_name", "checkpoint_folders", "prune", "data_difference"]

_NAME = re.compile(r"step-(\d+)")


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at ``step`` (``step-0000042``)."""
    return f"step-{step:07d}"


def checkpoint_folders(root: str | os.PathLike) -> list[tuple[int, str]]:
    """``(step, path)`` of every checkpoint folder under ``root``, oldest first (none if
    ``root`` does not exist)."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _NAME.fullmatch(name)
        path = os.path.join(root, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune(root: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoint folders under ``root``."""
    folders = checkpoint_folders(root)
    for _, path in folders[: max(len(folders) - keep, 0)]:
        shutil.rmtree(path)


def data_difference(saved: list[list], now: list[list]) -> str:
    """What changed between two data fingerprints (``[name, size]`` lists), in words; empty
    if nothing did."""
    before, after = dict(map(tuple, saved)), dict(map(tuple, now))
    parts = [f"added {n}" for n in sorted(after.keys() - before.keys())]
    parts += [f"removed {n}" for n in sorted(before.keys() - after.keys())]
    parts += [
        f"{n} changed size ({before[n]} -> {after[n]} bytes)"
        for n in sorted(before.keys() & after.keys())
        if before[n] != after[n]
    ]
    return "; ".join(parts)
