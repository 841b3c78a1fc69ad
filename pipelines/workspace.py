"""A checkout of the loop: git + DVC, our dvc.yaml and params.yaml, and the code the stages
run (`backend/`, `pipelines/`), copied in so that the checkout's git history and `dvc.lock`
name exactly the code that made each model. `tridentloop init` makes one for a user's Label
Studio project; the demo and the tests make theirs the same way.

dvc.yaml and params.yaml travel inside the package (`pipelines/loop/`, links to the files
at the repository root), so an installed tridentloop can write them.
"""

from __future__ import annotations

import difflib
import io
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

PACKAGES = ("backend", "pipelines")
DVC = [sys.executable, "-m", "dvc"]  # the DVC installed with us, whatever PATH says
# prelabel.report.json: what select's pre-labelling could not read, a fact of one run
GITIGNORE = "__pycache__/\n/models/\n.tridentloop/\nprelabel.report.json\n"


def _git(args: list[str], cwd: Path, env: dict[str, str] | None) -> None:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[-3:])} failed in {cwd}: {done.stderr.strip()}")


def _package_dir(name: str) -> Path:
    return Path(str(resources.files(name)))


_NOT_CODE = shutil.ignore_patterns("__pycache__", "*.pyc", "loop")


def _code_only(folder: str, names: list[str]) -> set[str]:
    """What copy_code leaves out: caches, the loop templates, and the shipped models' weights
    (backend/models/*/: the checkout names them by path, its git must not hold them)."""
    shipped = Path(folder).name == "models" and Path(folder).parent.name == "backend"
    return set(_NOT_CODE(folder, names)) | ({n for n in names if (Path(folder) / n).is_dir()}
                                            if shipped else set())


def copy_code(dest: Path) -> None:
    """The stages' code into `dest` (replacing what was there): what `dvc.yaml` declares."""
    for package in PACKAGES:
        shutil.rmtree(dest / package, ignore_errors=True)
        shutil.copytree(_package_dir(package), dest / package, ignore=_code_only)


def default_remote(dest: Path) -> str:
    """Where `init` keeps datasets and models when no `--remote` is given: a folder beside
    the checkout, by absolute path, so a teammate's clone on this machine or a shared disk
    pushes to and pulls from the same store (`dvc remote modify storage url ...` moves it)."""
    return str(dest.expanduser().absolute().parent / "tridentloop-dvc-remote")


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


def shipped_params() -> dict[str, Any]:
    import yaml

    return yaml.safe_load((_package_dir("pipelines") / "loop" / "params.yaml").read_text())


def _nearest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(choices)}"


def _fits(value: Any, default: Any) -> bool:
    """A value of the default's type; a number also where a float is, and where the default
    is `auto` (a number or auto)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    if isinstance(default, str) and default == "auto":
        return isinstance(value, str | int | float)
    return default is None or isinstance(value, type(default))


def check_settings(updates: dict[str, dict[str, Any]]) -> None:
    """Raise ValueError for a section or key the shipped params.yaml does not have (naming
    the nearest), or a value that is not of its default's type: a typo must not become a
    setting nobody reads, nor a training that dies hours later."""
    shipped = shipped_params()
    for section, values in updates.items():
        if section not in shipped:
            raise ValueError(f"--set {section}.*: params.yaml has no section {section!r}"
                             + _nearest(section, list(shipped)))
        for key, value in values.items():
            defaults = shipped[section]
            if key not in defaults:
                raise ValueError(f"--set {section}.{key}: params.yaml's {section} has no "
                                 f"setting {key!r}" + _nearest(key, list(defaults)))
            if not _fits(value, defaults[key]):
                raise ValueError(f"--set {section}.{key}={value!r}: expected a "
                                 f"{type(defaults[key]).__name__} like its default "
                                 f"{defaults[key]!r}")


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
