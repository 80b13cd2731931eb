"""The library's layout: production code never imports the dev tools; no import cycle.

Imports are read from the source (ast), not by importing, so the checks see imports inside functions
too (the library defers heavy imports into the functions that need them) and cost no TensorFlow.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "include" / "leukemia"
PACKAGE = "leukemia"

#: Modules that may import `leukemia.dev`: the command line (its `demo`, `synthetic` and
#: `s3-server` commands) and the dev package itself.
DEV_CALLERS = {"leukemia.cli", "leukemia.__main__"}


def module_name(path: Path) -> str:
    """`leukemia.dev.demo` for include/leukemia/dev/demo.py, `leukemia.dev` for its __init__.py."""
    parts = list(path.relative_to(LIBRARY.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(LIBRARY.rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> Iterator[str]:
    """The library modules `path` imports anywhere in its body (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y / from . import y
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            if target.split(".")[0] != PACKAGE:
                continue
            # `from leukemia import tracking` names a module; `from leukemia.config import env`
            # names something inside one: keep the longest prefix that is a module
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name:
                yield target


def import_graph() -> dict[str, set[str]]:
    modules = library_modules()
    known = set(modules)
    return {name: set(imported_modules(path, name, known)) for name, path in modules.items()}


def elementary_cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Every simple cycle, each rotated to start at its smallest module name."""
    found: set[tuple[str, ...]] = set()

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                found.add(tuple(path))
            elif nxt > start and nxt not in path:  # each cycle found once, from its smallest node
                walk(start, nxt, [*path, nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return found


def test_import_graph_sees_module_and_function_level_imports() -> None:
    graph = import_graph()
    assert "leukemia.config" in graph["leukemia.tasks.training_dag"]  # module level
    assert "leukemia.storage" in graph["leukemia.tasks.training_dag"]  # inside sync()
    assert "leukemia.dev.embedded" in graph["leukemia.dev.demo"]  # from leukemia.dev.x import y


def test_production_code_never_imports_the_dev_tools() -> None:
    known = set(library_modules())
    production = {
        name: path
        for name, path in library_modules().items()
        if name != "leukemia.dev"
        and not name.startswith("leukemia.dev.")
        and name not in DEV_CALLERS
    }
    for folder in ("dags", "plugins"):
        production.update({f"{folder}/{p.name}": p for p in sorted((ROOT / folder).glob("*.py"))})
    assert {
        "leukemia.storage",
        "leukemia.tasks.training_dag",
        "leukemia.scoring",
        "dags/leukemia_training.py",
    } <= set(production)
    offenders = {
        name: sorted(
            {m for m in imported_modules(path, name, known) if m.startswith("leukemia.dev")}
        )
        for name, path in production.items()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_library_has_no_import_cycle() -> None:
    """Following one training config from the DAG to its MLflow run only goes down the layers."""
    cycles = elementary_cycles(import_graph())
    assert cycles == set(), f"import cycle(s) {sorted(cycles)}: move the shared code down a layer"


def test_mlflow_logging_the_training_driver_and_selection_live_apart() -> None:
    """`tracking` only talks to MLflow; `runs` drives a configuration's training through it and
    `training`; `selection` ranks runs, and the stages that pick a run ask it."""
    graph = import_graph()
    assert {"leukemia.tracking", "leukemia.training"} <= graph["leukemia.runs"]
    assert not {"leukemia.runs", "leukemia.selection"} & graph["leukemia.tracking"]
    assert "leukemia.tracking" in graph["leukemia.selection"]
    assert {"leukemia.selection"} <= graph["leukemia.promotion"] & graph["leukemia.ensemble"]


#: The house rules on size: a DAG file is a table of contents of its tasks, a function one step.
MAX_DAG_FILE_LINES = 225
MAX_FUNCTION_LINES = 80


def test_dag_files_stay_short_and_no_library_function_is_over_80_lines() -> None:
    dag_files = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "dags").glob("*.py")}
    assert dag_files and max(dag_files.values()) <= MAX_DAG_FILE_LINES, dag_files
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
        for path in library_modules().values()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []
