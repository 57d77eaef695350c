"""The package's dependency graph: no cycles, layers one way, subpackages through public names only.

The layout is ``tl -> model -> pp -> io``, ``datasets -> io``, ``pl`` above all of them, and every
module resting on ``_constants``, ``_settings``, ``_logging`` and ``_utils`` (see
``docs/architecture.md``). The graph is read with :mod:`ast`, imports inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "sigmma_sc"
FOUNDATION = {"_constants", "_settings", "_logging", "_utils"}
# What each subpackage must never import (directly or through the package root).
FORBIDDEN = {
    "io": {"datasets", "pp", "model", "tl", "pl"},
    "datasets": {"pp", "model", "tl", "pl"},
    "pp": {"datasets", "model", "tl", "pl"},
    "model": {"datasets", "tl", "pl"},
    "tl": {"datasets", "pl"},
    "pl": {"datasets"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom, modules: set[str]) -> list[str]:
    """Modules a ``from ... import ...`` loads: ``pkg.name`` where that is a submodule, else ``pkg``."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """``{module: {imported sigmma_sc modules}}`` over every module of the package."""
    files = {_module_name(p): p for p in SRC.joinpath(PACKAGE).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = _resolve(name, path.name == "__init__.py", node, set(files))
            else:
                continue
            for t in targets:
                # Keep the longest prefix that is a module of the package.
                parts = t.split(".")
                while parts and ".".join(parts) not in files:
                    parts.pop()
                if parts and parts[0] == PACKAGE and ".".join(parts) != name:
                    deps.add(".".join(parts))
        graph[name] = deps
    return graph


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_graph_sees_the_package(graph):
    # The walker must find real edges, or every rule below passes vacuously.
    assert "sigmma_sc.tl._fit" in graph and "sigmma_sc.model" in graph["sigmma_sc.tl._fit"]
    assert sum(len(d) for d in graph.values()) > 50


def test_no_import_cycles(graph):
    # Package __init__ files re-export their own submodules; a cycle through them is the same cycle.
    cycles = _cycles(graph)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_imports_across_subpackages(graph):
    bad = []
    for mod, deps in graph.items():
        for dep in deps:
            parts = dep.split(".")
            if len(parts) < 3 or not parts[2].startswith("_"):
                continue  # a subpackage's public name (or a foundation module at the root)
            if _subpackage(dep) != _subpackage(mod):
                bad.append(f"{mod} -> {dep}")
        for dep in deps:
            parts = dep.split(".")
            if len(parts) == 2 and parts[1].startswith("_") and parts[1] not in FOUNDATION:
                bad.append(f"{mod} -> {dep}")
    assert not bad, "imports of another subpackage's private module:\n" + "\n".join(sorted(bad))


def test_layers_one_way(graph):
    bad = []
    for mod, deps in graph.items():
        sub = _subpackage(mod)
        for dep in deps:
            target = _subpackage(dep)
            if target in FORBIDDEN.get(sub, set()):
                bad.append(f"{mod} -> {dep}")
            if sub in FOUNDATION and target not in FOUNDATION | {None}:
                bad.append(f"{mod} -> {dep} (foundation modules import nothing above them)")
    assert not bad, "layer broken:\n" + "\n".join(sorted(bad))


def test_detects_a_cycle_and_a_broken_layer():
    # The checks themselves: a planted cycle and a planted upward import are found.
    planted = {"sigmma_sc.pp._a": {"sigmma_sc.pp._b"}, "sigmma_sc.pp._b": {"sigmma_sc.pp._a"}}
    assert _cycles(planted) == [["sigmma_sc.pp._a", "sigmma_sc.pp._b"]]
    assert "model" in FORBIDDEN["pp"] and "tl" in FORBIDDEN["model"]
