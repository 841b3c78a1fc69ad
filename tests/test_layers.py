"""Data flows one way (../shared/DESIGN.md): the loop and the batch job never reach into
the HTTP server, the engine imports nothing above it, and nothing imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import REPO


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative ones resolved)."""
    package = path.relative_to(REPO).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize(("folder", "forbidden"), [
    ("pipelines", "backend.serving"),
    ("backend/prelabel", "backend.serving"),
    ("backend/labelstudio", "backend.serving"),
    ("backend/media", "backend.serving"),
    ("backend/detection", "backend.serving"),
    ("backend/detection", "backend.imagery"),
    ("backend", "backend.cli"),
    ("pipelines", "backend.cli"),
])
def test_no_module_reaches_up_the_chain(folder, forbidden):
    offenders = sorted(
        str(path.relative_to(REPO)) for path in (REPO / folder).rglob("*.py")
        if "cli" not in path.relative_to(REPO).parts[:2] and any(
            name == forbidden or name.startswith(forbidden + ".") for name in _imports(path))
    )
    assert offenders == [], f"{offenders} import {forbidden}"


PACKAGE = [path for root in ("backend", "pipelines") for path in (REPO / root).rglob("*.py")]


def test_each_command_has_a_room_of_its_own():
    """One module per command, its parser and handler (as DVC's dvc/commands/), each
    short enough to read whole (at most 250 lines)."""
    rooms = {path.stem: len(path.read_text().splitlines())
             for path in (REPO / "backend/cli").glob("*.py")}
    assert {"predict", "serve", "prelabel", "model", "calibrate", "init", "bench",
            "demo", "main"} <= set(rooms)
    assert max(rooms.values()) <= 250, rooms


def test_no_function_is_longer_than_80_lines():
    long = sorted(f"{path.relative_to(REPO)}:{node.name} ({node.end_lineno - node.lineno + 1})"
                  for path in PACKAGE for node in ast.walk(ast.parse(path.read_text()))
                  if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.end_lineno - node.lineno + 1 > 80)
    assert long == []
