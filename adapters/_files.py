"""The checks of a path that must be an existing file or folder (private).

Every reader of a path a user gives (a data folder, a prompt file, a checkpoint's JSON or
safetensors file) checks it here, once, so a missing or misplaced path raises the same
error wherever it is read, naming what the path is for.
"""

from __future__ import annotations

import os

__all__ = ["check_file", "check_folder"]


def check_file(path: str | os.PathLike, what: str) -> str:
    """``path`` as a str; ``ValueError`` if it is a folder, ``FileNotFoundError`` if it does
    not exist, each naming it as ``what``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        if os.path.isdir(path):
            raise ValueError(f"{what} {path} is a folder, not a file")
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path


def check_folder(path: str | os.PathLike, what: str) -> str:
    """``path`` as a str; ``FileNotFoundError`` naming it as ``what`` unless it is a folder."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path
