"""dvc.yaml tells the truth about the code: every module a stage imports lies under one of
the paths the stage declares as a dependency, so a change to it re-runs the stage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.params import CODE_ROOTS

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _imported_sources(module: str) -> set[Path]:
    """The project's source files a fresh interpreter loads to import `module`."""
    listing = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print('\\n'.join("
         "getattr(m, '__file__', None) or '' for m in list(sys.modules.values())))"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    files = {Path(line).resolve() for line in listing}
    return {f.relative_to(ROOT) for f in files if f.name != "__init__.py"
            and any(f.is_relative_to(ROOT / code) for code in CODE_ROOTS)}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_declares_every_module_it_imports(stage):
    module = STAGES[stage]["cmd"].split(" -m ")[1].split()[0]
    declared = [Path(dep) for dep in STAGES[stage].get("deps", [])]
    undeclared = [source for source in _imported_sources(module)
                  if not any(source == dep or source.is_relative_to(dep) for dep in declared)]
    assert not undeclared, f"{stage} imports {sorted(map(str, undeclared))} undeclared"
