"""The tests mirror the package and call what users run (DESIGN.md section 6).

* every folder of ``tests/unit`` is a layer of ``nmcli`` (``base`` for the modules at its top,
  ``house`` for these checks);
* no test, fixture or benchmark reaches a private (``_``-prefixed) name of an nmcli module, by
  import or by attribute;
* benchmarks import nmcli and ``fixtures``, never ``tests``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = ROOT / "nmcli"
UNIT = ROOT / "tests" / "unit"


def _sources(*folders: str) -> list[Path]:
    return [path for folder in folders for path in sorted((ROOT / folder).rglob("*.py"))]


def test_unit_test_folders_are_the_layers() -> None:
    layers = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} - {"cli"}
    folders = {p.name for p in UNIT.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders <= layers | {"base", "house"}, (
        f"not a layer of nmcli: {sorted(folders - layers - {'base', 'house'})}"
    )
    loose = sorted(p.name for p in UNIT.glob("test_*.py"))
    assert not loose, f"unit tests belong in the folder of their layer: {loose}"


def test_no_private_nmcli_names_outside_the_package() -> None:
    reached = []
    for path in _sources("tests", "benchmarks", "fixtures", "examples"):
        tree = ast.parse(path.read_text())
        nmcli_modules = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
            if alias.name.startswith("nmcli")
        } | {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nmcli")
            for alias in node.names
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nmcli"):
                reached += [
                    f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")
                ]
            elif (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in nmcli_modules
            ):
                reached.append(f"{path.relative_to(ROOT)}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert not reached, "\n".join(reached)


def test_benchmarks_never_import_tests() -> None:
    offenders = []
    for path in _sources("benchmarks"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            offenders += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "tests"]
    assert not offenders, "\n".join(offenders)
