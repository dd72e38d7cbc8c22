"""Write a benchmark's table into its own section of docs/benchmarks.md.

Each benchmark owns the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``; a
new section is appended under ``title`` the first time. The header line records the device,
the versions, the date and the command, so every number in the file says where it came from.
"""

from __future__ import annotations

import platform
import sys
from datetime import date
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def provenance(device_name: str) -> str:
    """One line: device, python, torch (and triton when importable), date and command."""
    versions = f"Python {platform.python_version()}, torch {torch.__version__}"
    try:
        import triton

        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    command = "python " + " ".join(sys.argv)
    return f"Device: {device_name}; {versions}; {date.today().isoformat()}; command: `{command}`."


def update_section(name: str, title: str, body: str) -> Path:
    """Replace (or append) the section ``name`` of docs/benchmarks.md with ``body``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n{block}\n"
    DOCS.write_text(text)
    return DOCS
