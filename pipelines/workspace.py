"""Create a checkout of the loop elsewhere (git + DVC, our dvc.yaml, params.yaml and code),
for the demo and the tests, with some params changed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

SOURCE = Path(__file__).resolve().parents[1]


def _git(args: list[str], cwd: Path, env: dict[str, str] | None) -> None:
    subprocess.run(args, cwd=cwd, env=env, check=True, capture_output=True)


def create_loop_project(
    dest: Path, updates: dict[str, dict[str, Any]], env: dict[str, str] | None = None
) -> Path:
    """A committed git + DVC project at `dest`; `updates` merge into params.yaml sections."""
    dest.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(SOURCE / name, dest / name)
    for package in ("backend", "pipelines"):
        shutil.copytree(
            SOURCE / package, dest / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for section, values in updates.items():
        params.setdefault(section, {}).update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / ".gitignore").write_text("__pycache__/\n/models/\n")
    _git(["git", "init", "-q"], dest, env)
    _git(["git", "config", "user.email", "loop@tridentloop.invalid"], dest, env)
    _git(["git", "config", "user.name", "tridentloop"], dest, env)
    _git(["dvc", "init", "-q"], dest, env)
    _git(["git", "add", "-A"], dest, env)
    _git(["git", "commit", "-qm", "tridentloop loop project"], dest, env)
    return dest
