"""The tree keeps its promises: no import cycle between runs_etl's modules (imports inside
functions included), and the subpackages never reach up to the entry points above them."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

import runs_etl

SRC = Path(runs_etl.__file__).resolve().parent
PACKAGE = "runs_etl"
SUBPACKAGES = ("engine", "warehouse", "outputs", "ops", "sim")
# The entry points: they may import everything, nothing below them may import them.
TOP = ("runs_etl.cli", "runs_etl.jobs", "runs_etl.demo")


def module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports_of(name: str) -> set[str]:
    """Every runs_etl module ``name`` imports, anywhere in its body, relative imports resolved.

    ``from package import x`` counts as importing ``package.x`` when that is a module, else
    ``package`` itself. A package's own ancestors are left out: they are already being imported
    whenever the module is, so an ``__init__`` that imports its children is not a cycle.
    """
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"), filename=str(MODULES[name]))
    here = name if is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                child = f"{target}.{alias.name}"
                found.add(child if child in MODULES else target)
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {m for m in found if m in MODULES and m != name and m not in ancestors}


GRAPH = {name: imports_of(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_every_kind_of_import():
    """Guard for the checks below: relative, absolute and in-function imports are all found."""
    assert "runs_etl.engine.models" in GRAPH["runs_etl.engine.client"]  # from .models import
    assert "runs_etl.warehouse.ledger" in GRAPH["runs_etl.engine.sync"]  # from ..warehouse import
    assert "runs_etl.demo" in GRAPH["runs_etl.cli"]  # inside a function
    assert "runs_etl.warehouse.views" in GRAPH["runs_etl.warehouse"]  # a package's __init__


def test_find_cycle_names_the_modules_of_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_subpackages_never_import_the_entry_points(package):
    prefix = f"{PACKAGE}.{package}"
    offenders = sorted(f"{m} -> {t}" for m, targets in GRAPH.items()
                       if m == prefix or m.startswith(prefix + ".")
                       for t in targets if t in TOP)
    assert not offenders, offenders


def test_every_subpackage_ships_in_the_wheel():
    """A package missing from pyproject's list works in an editable install and is absent from
    the wheel users install."""
    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
                 ["tool"]["setuptools"]["packages"])
    src = root / "src"
    on_disk = {".".join(p.parent.relative_to(src).parts) for p in src.rglob("__init__.py")}
    assert on_disk - listed == set()
