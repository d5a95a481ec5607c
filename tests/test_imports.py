"""No import cycles among repwatch's modules, lazy imports included (issue 17).

A cycle hides even when every edge of it is a function-level import: the order in which modules
first run decides whether a name exists yet, and a refactor that hoists one import breaks start-up.
The graph is built from the source (every ``import`` statement, except under
``if TYPE_CHECKING:``), so the test needs neither torch nor the optional extras.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("monitor", "exporters")


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The module a dotted import name lands in (``a.b.func`` → ``a.b``)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports anywhere in its source."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = {id(node) for n in ast.walk(tree)
                   if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                   for stmt in n.body for node in ast.walk(stmt)}
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*parts, base] if base else parts)
                targets = [f"{base}.{a.name}" for a in node.names] or [base]
            for target in targets:
                hit = _resolve(target, mods)
                if hit is not None and hit != mod:
                    edges[mod].add(hit)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_imports() -> None:
    """The service imports Monitor inside a function (its torch backend): that edge is in the
    graph, beside the module-level ones."""
    graph = import_graph()
    assert "monitor.transport.errors" in graph["monitor.transport.shm"]
    assert "monitor.monitor" in graph["monitor.sidecar.service"]       # a lazy import


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


@pytest.mark.e2e
def test_import_contracts_hold() -> None:
    """The [tool.importlinter] contracts of pyproject.toml: the torch-free modules (the sidecar
    image has no torch) never import torch, directly or through another module, and the
    transports do not import the sidecar service."""
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in out.stdout
