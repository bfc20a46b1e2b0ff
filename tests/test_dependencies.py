"""pyproject.toml declares every package the product imports (search/, trainable/), and the
installed versions satisfy the declared ranges."""
from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _imported_top_levels() -> dict[str, str]:
    """Top-level module → the first file that imports it (stdlib and our own packages left out)."""
    found: dict[str, str] = {}
    for path in sorted([*ROOT.glob("search/**/*.py"), *ROOT.glob("trainable/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("search", "trainable"):
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def _declared(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def test_every_imported_package_is_declared() -> None:
    declared = _declared(PROJECT["dependencies"])
    optional = set().union(*(_declared(reqs) for reqs in PROJECT["optional-dependencies"].values()))
    dists = packages_distributions()
    missing = []
    for module, where in _imported_top_levels().items():
        names = {canonicalize_name(d) for d in dists.get(module, [module])}
        if not names & (declared | optional):
            missing.append(f"{module} ({where}; distribution {sorted(names)})")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_installed_versions_satisfy_the_declared_ranges() -> None:
    bad = [f"{r.name} {version(r.name)} not in {r.specifier}" for r in map(Requirement, PROJECT["dependencies"])
           if not r.specifier.contains(version(r.name), prereleases=True)]
    assert not bad
