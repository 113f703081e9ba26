"""The import graph of chatcluster: dependencies point one way, and the pure modules stay pure.

Every module is parsed with `ast`; every import counts, at the top, inside a
function or under `TYPE_CHECKING`, since each of them is a dependency that
shapes the order in which the code can be understood, changed and imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "chatcluster"
# Rules and data only: they must import nothing that does I/O or runs processes.
PURE = ("protocol", "chat", "roster", "config", "events", "telnet", "registry", "dispatch", "wire", "stopping",
        "textfmt", "settings", "rooms", "directory", "history", "backpressure")
IMPURE = ("worker", "bus", "broker", "supervisor", "cli", "upgrade", "migrate", "roles", "output", "shedding")


def imports_of(path: Path) -> set[str]:
    """The chatcluster modules that the module at `path` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif node.level == 0 and node.module and node.module.split(".")[0] == "chatcluster":
                parts = node.module.split(".")
                if len(parts) > 1:
                    found.add(parts[1])
                else:
                    found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "chatcluster" and len(parts) > 1:
                    found.add(parts[1])
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    return {name: imports_of(path) & modules.keys() - {name} for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for succ in graph[todo.pop()]:
            if succ not in seen:
                seen.add(succ)
                todo.append(succ)
    return seen


def test_the_graph_is_read_from_every_kind_of_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "from . import a, b as bee\n"
        "from .c import thing\n"
        "import chatcluster.d\n"
        "from chatcluster import e\n"
        "from chatcluster.f import g\n"
        "if TYPE_CHECKING:\n"
        "    from .h import H\n"
        "def later():\n"
        "    from . import i\n"
        "import os, json\n"
    )
    assert imports_of(module) == {"a", "b", "c", "d", "e", "f", "h", "i"}


def test_circles_are_found() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_at_all() -> None:
    assert circles(import_graph()) == []


@pytest.mark.parametrize("module", [m for m in PURE if (PACKAGE / f"{m}.py").exists()])
def test_pure_modules_depend_on_nothing_that_does_io(module: str) -> None:
    graph = import_graph()
    assert reachable(graph, module) & set(IMPURE) == set()


def test_the_control_plane_points_one_way() -> None:
    graph = import_graph()
    # The bus and the worker know nothing of who starts them or how they are upgraded.
    for low in ("worker", "bus", "broker", "migrate", "handoff", "roles", "stats", "paths", "procs"):
        assert reachable(graph, low) & {"supervisor", "cli", "upgrade", "upgrade_check"} == set(), low
    # The check of an upgrade imports everything; nothing imports it.
    assert not any("upgrade_check" in deps for deps in graph.values())
    assert "supervisor" not in reachable(graph, "upgrade")
