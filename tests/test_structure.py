"""How the code is built, read from its imports (AST): the packages are the layers that
docs/design.md orders, and no module imports a layer above its own; mpi4py only in comm/;
nn/ free of mpinn but for the errors; no import cycles; short functions and modules;
importing never starts MPI."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mpinn"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 60, 400


def layers() -> list[str]:
    """The layers, bottom first, as docs/design.md writes them ("cli > perf > ... > base")."""
    found = re.search(r"Layer order, top to bottom: `([a-z >]+)`",
                      (ROOT / "docs" / "design.md").read_text())
    assert found, "docs/design.md states the layer order: Layer order, top to bottom: `...`"
    return found.group(1).split(" > ")[::-1]


def name_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


NAMES = {name_of(p) for p in MODULES}


def imports(path: Path) -> set[str]:
    """The modules a file imports, anywhere in it (relative imports resolved); a name
    imported from a package counts as that module where it is one."""
    here = name_of(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in NAMES)
    return found


def layer(module: str) -> str | None:
    """The layer of a module of mpinn; None for the package's root (its version) and for
    __main__ (`python -m mpinn`)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__main__" else None


GRAPH = {name_of(p): {m for m in imports(p) if m in NAMES} - {name_of(p)} for p in MODULES}


@pytest.mark.fast
def test_every_module_lives_in_a_layer():
    assert {layer(n) for n in NAMES} - {None} == set(layers())
    at_top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert at_top == ["__init__.py", "__main__.py"], at_top  # the version, `python -m mpinn`


@pytest.mark.fast
def test_no_module_imports_a_layer_above_its_own():
    order = {name: rank for rank, name in enumerate(layers())}
    upward = [(module, target) for module, targets in GRAPH.items() for target in targets
              if layer(module) and layer(target) and order[layer(target)] > order[layer(module)]]
    assert not upward, upward


@pytest.mark.fast
def test_only_comm_imports_mpi4py():
    users = sorted(name_of(p) for p in MODULES
                   if any(m == "mpi4py" or m.startswith("mpi4py.") for m in imports(p)))
    assert users and all(layer(u) == "comm" for u in users), users


@pytest.mark.fast
def test_nn_imports_nothing_of_mpinn_but_the_errors():
    for path in MODULES:
        if layer(name_of(path)) == "nn":
            found = {m for m in imports(path) if m.startswith("mpinn")} \
                - {"mpinn.base.errors", "mpinn.base", "mpinn.nn"}
            assert all(layer(m) == "nn" for m in found), (path.name, found)
            assert not {"h5py", "mpi4py"} & imports(path), path.name


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None
    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


@pytest.mark.fast
def test_no_import_cycles_between_modules_or_packages():
    assert cycle(GRAPH) is None, cycle(GRAPH)
    packages: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        if layer(module):
            packages.setdefault(layer(module), set()).update(
                layer(t) for t in targets if layer(t) not in (None, layer(module)))
    assert cycle(packages) is None, cycle(packages)
    # the checks see what they must: a cycle and an upward import are found
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert "mpinn.comm.world" in GRAPH["mpinn.comm.collectives"]


@pytest.mark.fast
@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_and_modules_are_short(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{len(lines)} lines"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse("\n".join(lines)))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_importing_any_module_starts_no_mpi():
    """Every module imported in a fresh process: MPI is loaded, never initialised (an
    import that ran MPI_Init would tie a login-node command or the sweep driver to MPI)."""
    code = ("import importlib, sys\n"
            f"for name in {sorted(NAMES - {'mpinn.__main__'})!r}:\n"
            "    importlib.import_module(name)\n"
            "from mpi4py import MPI\n"
            "assert not MPI.Is_initialized(), 'an import started MPI'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr

