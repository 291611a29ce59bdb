"""The layer order of docs/architecture.md holds: no module imports from a layer above its own
or from a neighbour in its row, and no modules import each other in a cycle.

Imports are read from the source (every ``import`` statement, at module level or inside a
function: a lazy import is still a dependency), so the check needs nothing imported."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "attnkit"
DOC = ROOT / "docs" / "architecture.md"


@cache
def layer_rows() -> list[list[str]]:
    """The rows of the ```layers block, top to bottom, each a list of layer names."""
    match = re.search(r"```layers\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert match, f"{DOC} has no ```layers block"
    rows = []
    for line in match.group(1).splitlines():
        names = line.split("#", 1)[0].split("|")
        rows.append([n.strip() for n in names if n.strip()])
    return [r for r in rows if r]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    path = modules()[name]
    return read_imports(name, path.name == "__init__.py", path.read_text(encoding="utf-8"), set(modules()))


def read_imports(name: str, is_package: bool, source: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports in ``source`` (``from pkg import
    sub`` counts as ``pkg.sub`` when that is a module, as ``pkg`` otherwise)."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & known
            found |= subs if len(subs) == len(node.names) else {target, *subs}
    return {m for m in found if m in known and m != name}


def layer_of(name: str) -> tuple[int, str]:
    """(row index from the top, layer name) of module ``attnkit.X...``."""
    top = name.split(".")[1] if "." in name else ""
    for i, row in enumerate(layer_rows()):
        if top in row:
            return i, top
    raise AssertionError(f"{name}: its layer {top!r} is not in the ```layers block of {DOC.name}")


def checked_modules() -> list[str]:
    # attnkit/__init__.py is the package's public face: it re-exports from several layers
    return [m for m in modules() if m != "attnkit"]


def test_layers_block_is_well_formed():
    names = [n for row in layer_rows() for n in row]
    assert len(names) == len(set(names)), f"a layer is listed twice: {names}"
    tops = {m.split(".")[1] for m in checked_modules()}
    assert tops <= set(names), f"modules outside every layer: {sorted(tops - set(names))}"


def test_no_import_climbs_a_layer():
    climbs = []
    for name in checked_modules():
        row, layer = layer_of(name)
        for dep in imports_of(name):
            if dep == "attnkit":
                climbs.append(f"{name} imports the package root (import the module it needs)")
                continue
            dep_row, dep_layer = layer_of(dep)
            if dep_row < row or (dep_row == row and dep_layer != layer):
                climbs.append(f"{name} ({layer}) imports {dep} ({dep_layer})")
    assert not climbs, "imports against the layer order:\n" + "\n".join(sorted(climbs))


def test_no_import_cycles():
    graph = {m: imports_of(m) for m in checked_modules()}
    # a package's __init__ re-exporting its submodules is how a package is built; a submodule
    # importing back from its own package's __init__ is a cycle through it
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


KNOWN = {"attnkit", "attnkit.fit", "attnkit.fit.coverage", "attnkit.viz", "attnkit.viz.record",
         "attnkit.caches", "attnkit.functional", "attnkit.apps", "attnkit.apps.explain"}  # fmt: skip


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from ..viz import record\n", {"attnkit.viz.record"}),
        ("from ..viz.record import AttentionRecord\n", {"attnkit.viz.record"}),
        ("from ..viz import lost_mass\n", {"attnkit.viz"}),
        ("from .. import caches, functional\n", {"attnkit.caches", "attnkit.functional"}),
        ("def f():\n    from ..apps import explain\n", {"attnkit.apps.explain"}),
        ("import attnkit.viz.record\n", {"attnkit.viz.record"}),
        ("from . import viz\n", {"attnkit.fit"}),  # a name in attnkit.fit/__init__.py, not a module
    ],
)
def test_imports_are_read_as_written(source, expected):
    """Relative, submodule and lazy imports are all seen (a reader that missed them would pass
    every tree)."""
    assert read_imports("attnkit.fit.coverage", False, source, KNOWN) == expected
