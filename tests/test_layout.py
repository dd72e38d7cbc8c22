"""The source layout issue 23 asks for, kept: no import cycle between modules, and no module of
the core (``mfcore/``) or the adapters (``adapters/``) over 600 lines (one concept per file;
the toys are not held to it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# where each package's modules live on disk (pyproject's package-dir)
PACKAGES = {"mfcore": ROOT / "mfcore", "mfcore.adapters": ROOT / "adapters",
            "mfcore.toys": ROOT / "toys"}  # fmt: skip
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ours that ``path`` imports, anywhere in it except a ``__main__`` guard
    (which runs as a program, never on import)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    body = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n))]
    out = set()
    for node in ast.walk(ast.Module(body=body, type_ignores=[])):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out.update(n for n in names if n in modules)
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycle_between_modules():
    modules = _modules()
    packages = {name for name, path in modules.items() if path.name == "__init__.py"}
    graph = {
        name: _imports(path, modules) - packages - {name}
        for name, path in modules.items()
        if name not in packages  # a package's __init__ gathers its children by design
    }
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("package", ["mfcore", "mfcore.adapters"])
def test_no_module_over_600_lines(package):
    folder = PACKAGES[package]
    long = {
        str(path.relative_to(ROOT)): n
        for path in folder.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_no_private_name_is_imported_across_modules():
    """A module uses another's public names only (a ``_`` module such as ``mfcore._checks``
    is the package's own, and its names are public to the package)."""
    crossing = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mfcore"):
                crossing += [f"{name}: {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_")]  # fmt: skip
    assert crossing == []
