"""Every shell block of the README and ``docs/*.md`` runs, page by page (issue 22).

The blocks of a page run in order with ``bash -e`` in one working folder, as a reader would
paste them (a later block reads what an earlier one wrote). A block with no marker runs as
written; ``<!-- doctest: tiny NAME -->`` runs its tiny form (``tests/_doc_shell.py``: a tiny
checkpoint in place of ``/models/...``, a few steps); ``<!-- doctest: skip REASON -->`` is
not run, and says why (an install, many GPUs, an experiment of minutes to hours).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._doc_blocks import Block, doc_pages, iter_blocks
from tests._doc_shell import SHELL_TINY, tiny_form

SHELL = ("bash", "sh", "shell")


def shell_blocks(page: Path) -> list[Block]:
    return [b for b in iter_blocks(page) if b.lang in SHELL]


def _runnable(block: Block) -> bool:
    return block.marker is None or block.marker.kind != "skip"


PAGES = [p for p in doc_pages() if any(_runnable(b) for b in shell_blocks(p))]


def _env() -> dict[str, str]:
    env = dict(os.environ)  # this interpreter's scripts (mfcore-distill) first on the PATH
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONWARNINGS"] = "ignore"
    return env


@pytest.mark.slow  # minutes of CPU (each command starts the library afresh): CI runs it once
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_shell_blocks_of_page_run(page, tmp_path):
    for block in filter(_runnable, shell_blocks(page)):
        code, marker = block.code, block.marker
        if marker is not None:
            code = tiny_form(code, SHELL_TINY[marker.arg](tmp_path))
        done = subprocess.run(
            ["bash", "-e", "-c", code], cwd=tmp_path, env=_env(), capture_output=True,
            text=True, timeout=900,
        )  # fmt: skip
        assert done.returncode == 0, (
            f"{block.page}:{block.lineno} failed ({done.returncode}):\n{code}\n"
            f"{done.stderr[-3000:]}"
        )


def test_every_shell_marker_names_a_setup_or_a_reason():
    used = set()
    for page in doc_pages():
        for block in shell_blocks(page):
            if block.marker is not None and block.marker.kind == "tiny":
                assert block.marker.arg in SHELL_TINY, f"{block.page}:{block.lineno}"
                used.add(block.marker.arg)
    assert used == set(SHELL_TINY), f"unused shell setups {set(SHELL_TINY) - used}"
