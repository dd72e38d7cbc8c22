"""The core (mfcore/) never imports diffusers, transformers, peft or matplotlib."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import mfcore

FORBIDDEN = ("diffusers", "transformers", "peft", "matplotlib")
CORE = Path(mfcore.__file__).parent


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_forbidden_import_statements():
    files = sorted(CORE.rglob("*.py"))
    assert files, "found no core sources"
    offenders = {
        str(f.relative_to(CORE)): sorted(_imported_roots(f) & set(FORBIDDEN)) for f in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_every_core_module_loads_no_framework():
    names = [
        m.name
        for m in pkgutil.walk_packages([str(CORE)], prefix="mfcore.")
        if not m.name.startswith(("mfcore.adapters", "mfcore.toys"))
    ]
    code = (
        "import importlib, sys\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core modules pulled in: {out.stdout.strip()}"
