"""The product's import graph: no circle between modules, and the tiers point one way.

Every ``import`` in the product packages is read with :mod:`ast` -- at module level,
inside functions and under ``if TYPE_CHECKING:`` alike, because a deferred import is
still a dependency and hides a circle rather than removing it. ``from pkg import name``
is an edge to ``pkg.name`` when that is a module, else to ``pkg`` itself.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("privacy", "coordinator", "silo_node", "migrations", "helper")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _imported(path: Path, module: str) -> Iterator[tuple[str, int]]:
    """(absolute module name, line) for every import statement in ``path``."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                yield (f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base), node.lineno


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}; every imported name, product or not."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in MODULES.items():
        edges: dict[str, int] = {}
        for target, line in _imported(path, module):
            # `import a.b.c` of a product module: the deepest name that is a module.
            while target not in MODULES and "." in target and target.split(".")[0] in PACKAGES:
                target = target.rpartition(".")[0]
            if target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


GRAPH = _graph()


def _circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One circle per strongly connected component of product modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    circles = []
    for component in components:
        inside = set(component)
        start = min(component)
        # Shortest way back to the start, breadth first, staying inside the component.
        paths = {start: [start]}
        frontier = [start]
        circle: list[str] | None = None
        while frontier and circle is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        circle = [*paths[v], start]
                        break
                    if w in inside and w not in paths:
                        paths[w] = [*paths[v], w]
                        nxt.append(w)
                if circle:
                    break
            frontier = nxt
        circles.append(circle or sorted(component))
    return circles


def _describe(circle: list[str]) -> str:
    return " -> ".join(
        f"{a} (line {GRAPH[a][b]})" if b in GRAPH.get(a, {}) else a for a, b in zip(circle, circle[1:] + [""])
    )


def test_the_walk_sees_the_product() -> None:
    # Guards the test itself: a walk that found nothing would pass vacuously.
    assert {"privacy.envelope", "coordinator.fold", "silo_node.daemon", "migrations.env"} <= set(MODULES)
    assert "silo_node.client_errors" in GRAPH["silo_node.daemon"]
    assert "coordinator.audit" in GRAPH["coordinator.verify"]  # a function-level import


def test_the_circle_finder_names_a_circle() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    assert _circles(graph) == [["a", "b", "c", "a"]]
    assert _circles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_circle_in_product_code() -> None:
    circles = _circles(GRAPH)
    assert not circles, "import circles:\n" + "\n".join(_describe(c) for c in circles)


def _reaches(module: str) -> set[str]:
    """Everything ``module`` imports, following product modules transitively."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for target in GRAPH[todo.pop()]:
            if target not in seen:
                seen.add(target)
                if target in GRAPH:
                    todo.append(target)
    return seen


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.split(".")[0] == "privacy"))
def test_privacy_imports_neither_coordinator_nor_silo(module: str) -> None:
    bad = sorted(t for t in _reaches(module) if t.split(".")[0] in ("coordinator", "silo_node"))
    assert not bad, f"{module} (the shared tier) imports {bad}"


def test_strategies_are_pure_tensor_math() -> None:
    forbidden = ("sqlalchemy", "starlette", "httpx", "cryptography")
    bad = sorted(t for t in _reaches("coordinator.strategies") if t.split(".")[0] in forbidden)
    assert not bad, f"coordinator.strategies imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.split(".")[0] in ("coordinator", "silo_node")))
def test_neither_the_coordinator_nor_the_silo_imports_the_helper(module: str) -> None:
    # The helper is another institution's service: the coordinator and silos speak to it
    # over HTTP only, never by importing its code.
    bad = sorted(t for t in _reaches(module) if t.split(".")[0] == "helper")
    assert not bad, f"{module} imports {bad}"
