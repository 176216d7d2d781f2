"""The package's house rules that a test can check: here, that its modules import without cycles.

An import cycle makes a module's names depend on which module was imported first, and forces lazy
imports to break it; a package whose import graph is acyclic can be read bottom up. The graph is
built from the source with ``ast``: every ``import`` and ``from ... import`` of a module of the
package, at any depth of the file (imports inside functions count: a lazy import still joins the
cycle), except those under ``if TYPE_CHECKING:``, which never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import anymodal
import anymodal.configs
import anymodal.encoders
import anymodal.generators

PACKAGE = "anymodal.toyworld"  # the examples of the graph test
# the installed package is four source folders (pyproject's package-dir): each folder's dotted name
ROOTS = {pkg.__name__: Path(pkg.__file__).parent
         for pkg in (anymodal, anymodal.encoders, anymodal.generators, anymodal.configs)}


def _module_name(root_name: str, path: Path) -> str:
    rel = path.relative_to(ROOTS[root_name]).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([root_name, *parts])


def _source_files() -> dict[str, Path]:
    files = {}
    for root_name, root in ROOTS.items():
        for path in root.rglob("*.py"):
            if root_name == "anymodal" and any(p in path.relative_to(root).parts for p in ("assets",)):
                continue
            files[_module_name(root_name, path)] = path
    return files


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def import_graph() -> dict[str, set[str]]:
    """``{module: the package's modules it imports}`` for every module of the installed package."""
    paths = _source_files()
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skipped = _type_checking_nodes(tree)
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                module = _resolve(name, path.name == "__init__.py", node)
                targets.add(module)
                targets |= {f"{module}.{a.name}" for a in node.names}  # from . import world
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None when it has none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
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


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_relative_and_lazy_imports():
    graph = import_graph()
    assert f"{PACKAGE}.world" in graph[f"{PACKAGE}.checkers"]  # from .world import ...
    assert f"{PACKAGE}.evaluate" in graph[f"{PACKAGE}.runner"]  # imported inside a function


def test_the_package_has_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_the_entry_point_imports_the_cli():
    """The CLI is a leaf: it imports the commands' modules, never the other way round, so a library
    module never drags in the CLI (or, through it, every other command)."""
    graph = import_graph()
    importers = sorted(m for m, deps in graph.items() if "anymodal.cli" in deps and m != "anymodal.__main__")
    assert importers == [], f"these modules import anymodal.cli: {importers}"
