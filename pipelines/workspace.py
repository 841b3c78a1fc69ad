"""A checkout of the loop: git + DVC, our dvc.yaml and params.yaml, and the code the stages
run (`backend/`, `pipelines/`), copied in so that the checkout's git history and `dvc.lock`
name exactly the code that made each model. `tridentloop init` makes one for a user's Label
Studio project; the demo and the tests make theirs the same way.

dvc.yaml and params.yaml travel inside the package (`pipelines/loop/`, links to the files
at the repository root), so an installed tridentloop can write them.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

PACKAGES = ("backend", "pipelines")
DVC = [sys.executable, "-m", "dvc"]  # the DVC installed with us, whatever PATH says
GITIGNORE = "__pycache__/\n/models/\n.tridentloop/\n"


def _git(args: list[str], cwd: Path, env: dict[str, str] | None) -> None:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[-3:])} failed in {cwd}: {done.stderr.strip()}")


def _package_dir(name: str) -> Path:
    return Path(str(resources.files(name)))


def copy_code(dest: Path) -> None:
    """The stages' code into `dest` (replacing what was there): what `dvc.yaml` declares."""
    for package in PACKAGES:
        shutil.rmtree(dest / package, ignore_errors=True)
        shutil.copytree(_package_dir(package), dest / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "loop", "models"))


def create_loop_project(
    dest: Path, updates: dict[str, dict[str, Any]], env: dict[str, str] | None = None,
    remote: str | None = None,
) -> Path:
    """A committed git + DVC project at `dest` (which must not exist or be empty);
    `updates` merge into params.yaml sections; `remote` becomes the default DVC remote."""
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} exists and is not empty: choose a new folder")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        _populate(dest, updates, env, remote)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)  # no half-made checkout left behind
        raise
    return dest


def _populate(dest: Path, updates: dict[str, dict[str, Any]], env: dict[str, str] | None,
              remote: str | None) -> None:
    templates = _package_dir("pipelines") / "loop"
    shutil.copy(templates / "dvc.yaml", dest / "dvc.yaml")
    copy_code(dest)
    (dest / "params.yaml").write_text(updated_params((templates / "params.yaml").read_text(),
                                                     updates))
    (dest / ".gitignore").write_text(GITIGNORE)
    _git(["git", "init", "-q"], dest, env)
    if not _has_git_identity(dest, env):
        _git(["git", "config", "user.email", "loop@tridentloop.invalid"], dest, env)
        _git(["git", "config", "user.name", "tridentloop"], dest, env)
    _git([*DVC, "init", "-q"], dest, env)
    if remote:
        _git([*DVC, "remote", "add", "-d", "storage", remote], dest, env)
    _git(["git", "add", "-A"], dest, env)
    _git(["git", "commit", "-qm", "tridentloop loop project"], dest, env)


def updated_params(text: str, updates: dict[str, dict[str, Any]]) -> str:
    """params.yaml with `updates` merged into its sections, its comments (the settings'
    documentation) kept: ruamel.yaml's round trip, as DVC itself edits YAML."""
    from ruamel.yaml import YAML

    yaml = YAML()
    params = yaml.load(text)
    for section, values in updates.items():
        params.setdefault(section, {}).update(values)
    out = io.StringIO()
    yaml.dump(params, out)
    return out.getvalue()


def _has_git_identity(cwd: Path, env: dict[str, str] | None) -> bool:
    found = subprocess.run(["git", "config", "user.email"], cwd=cwd, env=env,
                           capture_output=True, text=True)
    return bool(found.stdout.strip())
