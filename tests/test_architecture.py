"""The house rules, read from the source (docs/architecture.md):

* no import circles among the modules of `search/` and `trainable/` (imports at module level and
  inside functions both count; `if TYPE_CHECKING:` blocks do not: they never run);
* `trainable` never imports `search` (trials run without the driver's code);
* no `_private` name is imported from another module — in the product, its tests or benchmarks.

`import_graph` is a plain function of a source tree, so the test also proves that it finds a
circle and a private import when one is written into a copy of the tree.
"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("search", "trainable")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: module level, in functions and classes, not under TYPE_CHECKING."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES
                 ) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """(module → the project modules it imports, [(module, imported module, private name)])."""
    files = {module_name(root, p): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    private: list[tuple[str, str, str]] = []

    def project_module(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            else:
                src = _resolve(module, node, path.name == "__init__.py")
                # `from pkg import mod` imports the module pkg.mod when it exists
                targets = [(f"{src}.{a.name}" if f"{src}.{a.name}" in files else src, a.name) for a in node.names]
            for target, name in targets:
                dep = project_module(target)
                if dep is None or dep == module:
                    continue
                graph[module].add(dep)
                if name and name.startswith("_") and not name.startswith("__") and target == dep \
                        and f"{dep}.{name}" not in files:
                    private.append((module, dep, name))
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def _private_imports_in(root: Path, folders: tuple[str, ...]) -> list[str]:
    """`from search…/trainable… import _name` in files outside the packages (tests, benchmarks)."""
    bad = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            for node in _imports(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                    bad += [f"{path.relative_to(root)}: from {node.module} import {a.name}"
                            for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return bad


def test_no_import_circles() -> None:
    graph, _ = import_graph(ROOT)
    assert len(graph) > 40, "the graph should hold every module of search/ and trainable/"
    assert cycles(graph) == []


def test_trainable_never_imports_search() -> None:
    graph, _ = import_graph(ROOT)
    wrong = sorted((m, d) for m, deps in graph.items() if m.startswith("trainable") for d in deps
                   if d.split(".")[0] == "search")
    assert wrong == []


def test_no_private_name_crosses_a_module() -> None:
    _, private = import_graph(ROOT)
    assert private == []
    assert _private_imports_in(ROOT, ("tests", "benchmarks")) == []


@pytest.fixture()
def tree_copy(tmp_path: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_rules_catch_a_circle_and_a_private_import(tree_copy: Path) -> None:
    """Write a function-level import that closes a circle (finetune → trial → train.finetune) and a
    private import into a copy of the tree: the checks above must see both."""
    finetune = tree_copy / "trainable" / "train" / "finetune.py"
    finetune.write_text(finetune.read_text() + "\n\ndef _late():\n    from trainable.trial import _reporter\n")
    graph, private = import_graph(tree_copy)
    assert ["trainable.train.finetune", "trainable.trial"] in cycles(graph)
    assert ("trainable.train.finetune", "trainable.trial", "_reporter") in private


def test_type_checking_imports_do_not_count(tree_copy: Path) -> None:
    lockstep = tree_copy / "trainable" / "train" / "lockstep.py"
    lockstep.write_text(lockstep.read_text() + "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                        "    from trainable.trial import run_trial\n")
    graph, _ = import_graph(tree_copy)
    assert "trainable.trial" not in graph["trainable.train.lockstep"]
    assert cycles(graph) == []
