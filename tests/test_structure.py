"""How the code is built, checked: short functions, MPI in one module, the model free of
MPI and files, and nothing below the training loop importing it (docs/design.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mpinn"
MODULES = sorted(PACKAGE.rglob("*.py"))
# argparse declarations: long lists of options, not logic
PARSER_TABLES = ("build_parser",)


def imports(path: Path) -> set[str]:
    """The modules a file imports (relative imports as mpinn.NAME)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ("mpinn." if node.level else "") + (node.module or "")
            names.add(base.rstrip("."))
            if node.level and not node.module:
                names.update(f"mpinn.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_functions_are_short(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 60 and node.name not in PARSER_TABLES]
    assert not long, long


def test_only_dist_imports_mpi4py():
    users = [p.name for p in MODULES if any(m.startswith("mpi4py") for m in imports(p))]
    assert users == ["dist.py"], users


def test_the_model_knows_no_mpi_and_no_files():
    for name in ("model.py", "functional.py", "optim.py"):
        found = imports(PACKAGE / "nn" / name) & {"mpinn.comm.dist", "mpi4py", "h5py",
                                                  "mpinn.base.files"}
        assert not found, (name, found)


def test_nothing_below_the_loop_imports_the_loop():
    for path in MODULES:
        if path.parent.name != "cli" and path.name != "loop.py":
            assert "mpinn.train.loop" not in imports(path), path.name
