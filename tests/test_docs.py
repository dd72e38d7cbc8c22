"""Every ```python block of the README and ``docs/*.md`` runs, page by page.

The blocks of a page run in order in one namespace, as a reader would paste them. A block
marked ``<!-- doctest: tiny NAME -->`` runs with the tiny objects of ``NAME``
(``tests/_doc_tiny.py``), which also asserts what the block claims; one marked
``<!-- doctest: skip REASON -->`` is skipped, and must say why (see ``tests/_doc_blocks.py``).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests._doc_blocks import Block, doc_pages, iter_blocks, parse_marker
from tests._doc_tiny import TINY

PYTHON = ("python", "py")


def _python_blocks(page: Path) -> list[Block]:
    return [b for b in iter_blocks(page) if b.lang in PYTHON]


def _runs(block: Block) -> bool:
    return block.marker is None or block.marker.kind != "skip"


PAGES = [p for p in doc_pages() if any(map(_runs, _python_blocks(p)))]


@contextmanager
def _tiny(block: Block, ns: dict, tmp: Path):
    if block.marker is None:
        yield
        return
    tmp.mkdir()
    setup = TINY[block.marker.arg](ns, tmp)
    next(setup)
    try:
        yield
    except BaseException:
        setup.close()
        raise
    with pytest.raises(StopIteration):
        next(setup)  # the setup's checks


def _run(block: Block, ns: dict, tmp: Path) -> None:
    # pad so that a traceback names the block's own line in the page
    code = compile("\n" * (block.lineno - 1) + block.code, block.page, "exec")
    with _tiny(block, ns, tmp):
        exec(code, ns)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_of_page_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    ns: dict = {"__name__": f"doc:{page.name}"}
    ran = 0
    for block in filter(_runs, _python_blocks(page)):
        _run(block, ns, tmp_path / f"block{block.lineno}")
        ran += 1
    assert ran > 0


def test_every_marker_is_valid_and_on_a_block():
    for page in doc_pages():
        lines = page.read_text().splitlines()
        markers = [i for i, ln in enumerate(lines) if re.match(r"\s*<!--\s*doctest:", ln)]
        for i in markers:
            parse_marker(lines[i], f"{page.name}:{i + 1}")  # raises on a bad kind or no arg
        marked = [b for b in iter_blocks(page) if b.marker is not None]
        assert len(marked) == len(markers), f"{page.name}: a doctest marker before no block"
        for b in marked:  # (shell blocks' tiny setups: tests/test_doc_commands.py)
            if b.lang in PYTHON:
                assert b.marker.kind != "tiny" or b.marker.arg in TINY, f"{b.page}:{b.lineno}"


def test_every_tiny_setup_is_used():
    used = {b.marker.arg for p in doc_pages() for b in iter_blocks(p) if b.marker}
    assert set(TINY) <= used


def test_collector_reads_fences_markers_and_languages(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n<!-- doctest: skip needs a GPU -->\n\n```python\nx = 1\n```\n"
        "- item\n  ```bash\n  echo hi\n  ```\n```\nplain\n```\n"
    )
    monkeypatch.setattr("tests._doc_blocks.ROOT", tmp_path)
    blocks = list(iter_blocks(page))
    assert [(b.lineno, b.lang, b.code) for b in blocks] == [
        (5, "python", "x = 1\n"),
        (9, "bash", "echo hi\n"),
        (12, "", "plain\n"),
    ]
    assert blocks[0].marker == ("skip", "needs a GPU") and blocks[1].marker is None
    page.write_text("<!-- doctest: skip -->\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="needs a reason"):
        list(iter_blocks(page))
    page.write_text("<!-- doctest: maybe x -->\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="marker kind"):
        list(iter_blocks(page))
