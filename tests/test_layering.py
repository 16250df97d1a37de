"""core/ is the science: it must not import the orchestration stack."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

FORBIDDEN = {"prefect", "mlflow", "dvc", "great_expectations"}
CORE = Path(__file__).resolve().parents[1] / "core"


def imported_roots(path: Path) -> set[str]:
    """Top-level package names a module imports, anywhere in the file."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_module_does_not_import_orchestration(path: Path):
    assert not imported_roots(path) & FORBIDDEN


def test_layering_check_catches_a_forbidden_import(tmp_path: Path):
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    import mlflow\n")
    assert imported_roots(module) & FORBIDDEN == {"mlflow"}
