"""The rooms of docs/architecture.md, checked from the source: no import cycle, each package importing only the rooms
upstream of it, Ray only in ``sweeps/``, and no module grown back past a screenful of screens.

Imports are read with ``ast`` (nothing is imported), counting those inside functions and under ``TYPE_CHECKING``: a
lazy import hides a cycle from Python, not from the next engineer.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "tasks", "sweeps", "analysis")
# What each package must never import (docs/architecture.md): the model knows nothing of tasks, the tasks nothing of
# trials, and analysis reads the database the driver writes, never the code that ran the trials.
FORBIDDEN = {
    "model": ("tasks", "sweeps", "analysis", "ray"),
    "tasks": ("sweeps", "analysis", "ray"),
    "analysis": ("sweeps", "ray"),
}
MAX_LINES = 650  # the longest module left (analysis/db.py, tasks/base.py) with room; the split files were 1,000+
MAX_LINES_OF = {"sweeps/launch.py": 250}  # the CLI: parser, checks, dispatch
MAX_LINES_UNDER = {"analysis/guide/": 400}  # one module per part of the guide


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (relative imports resolved against ``name``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Project module -> the project modules it imports (``from pkg import name`` counts as the module ``pkg.name``
    where there is one, else as ``pkg``)."""
    paths = {module_name(root, p): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    graph = {}
    for name, path in paths.items():
        targets = set()
        for imported in imported_names(path, name):
            while imported and imported not in paths:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        return list(err.args[1])
    return None


def test_the_checker_finds_a_cycle_hidden_in_a_function_and_one_under_type_checking(tmp_path: Path) -> None:
    pkg = tmp_path / "model"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from model.b import g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    assert sorted(set(find_cycle(import_graph(tmp_path, ("model",))))) == ["model.a", "model.b"]
    (pkg / "b.py").write_text("import os\n")
    assert find_cycle(import_graph(tmp_path, ("model",))) is None


def test_no_import_cycle_anywhere() -> None:
    assert find_cycle(import_graph(ROOT)) is None


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_each_package_imports_only_what_is_upstream_of_it(package: str) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        name = module_name(ROOT, path)
        for imported in imported_names(path, name):
            if imported.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_module_has_grown_past_its_room() -> None:
    long = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            lines = len(path.read_text().splitlines())
            under = [limit for folder, limit in MAX_LINES_UNDER.items() if rel.startswith(folder)]
            limit = MAX_LINES_OF.get(rel, min(under, default=MAX_LINES))
            if lines > limit:
                long.append(f"{rel}: {lines} lines (limit {limit})")
    assert not long, "\n".join(long)
