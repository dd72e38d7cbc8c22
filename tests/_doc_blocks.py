"""The fenced code blocks of the README and ``docs/*.md``, with their doctest markers.

A block may carry a marker: an HTML comment on the nearest non-blank line before its fence
(invisible on a rendered page)::

    <!-- doctest: tiny NAME -->       run it with the tiny objects of ``NAME`` (tests/_doc_tiny.py)
    <!-- doctest: skip REASON -->     do not run it; REASON says why, and must be given

Python blocks without a marker run as written. Blocks of one page share one namespace and
run in page order. :func:`iter_blocks` yields every fenced block (any language, ``lang`` is
``""`` for a bare fence), so the shell blocks can be collected the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
MARKER_KINDS = ("tiny", "skip")
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<lang>[\w+-]*)[ \t]*$")
_MARKER = re.compile(r"^\s*<!--\s*doctest:\s*(?P<body>.*?)\s*-->\s*$")


class Marker(NamedTuple):
    kind: str  # "tiny" or "skip"
    arg: str  # the tiny setup's name, or the reason for skipping


class Block(NamedTuple):
    page: str  # path relative to the repository root, e.g. "docs/concepts.md"
    lineno: int  # 1-based line of the block's first code line
    lang: str
    code: str  # dedented by the fence's indentation
    marker: Marker | None


def doc_pages() -> list[Path]:
    """The README and every page of ``docs/``, in a fixed order."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def parse_marker(line: str, where: str) -> Marker | None:
    """The marker on ``line``, ``None`` if it holds none; ``ValueError`` if malformed."""
    m = _MARKER.match(line)
    if m is None:
        return None
    kind, _, arg = m["body"].partition(" ")
    arg = arg.strip()
    if kind not in MARKER_KINDS:
        raise ValueError(
            f"{where}: doctest marker kind must be one of {MARKER_KINDS}, not {kind!r}"
        )
    if not arg:
        what = "a setup name" if kind == "tiny" else "a reason"
        raise ValueError(f"{where}: '<!-- doctest: {kind} -->' needs {what}")
    return Marker(kind, arg)


def iter_blocks(page: Path) -> Iterator[Block]:
    """Yield ``(page, lineno, lang, code, marker)`` for each fenced block of ``page``."""
    lines = page.read_text().splitlines()
    rel = page.relative_to(ROOT).as_posix()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        marker = _marker_before(lines, i, f"{rel}:{i + 1}")
        indent, ticks = fence["indent"], fence["ticks"]
        end = i + 1
        while end < len(lines) and lines[end].strip() != ticks:
            end += 1
        if end == len(lines):
            raise ValueError(f"{rel}:{i + 1}: fence never closed")
        body = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[i + 1 : end]]
        code = "\n".join(body) + "\n"
        yield Block(rel, i + 2, fence["lang"], code, marker)
        i = end + 1


def _marker_before(lines: list[str], fence: int, where: str) -> Marker | None:
    j = fence - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    return parse_marker(lines[j], where) if j >= 0 else None
