"""params.yaml, the one place a stage's settings come from (DVC tracks it per stage)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, NoReturn

import yaml

PARAMS_FILE = Path(os.environ.get("TRIDENTLOOP_PARAMS", "params.yaml"))


def load_params(section: str | None = None) -> dict[str, Any]:
    if not PARAMS_FILE.is_file():
        raise SystemExit(
            f"{PARAMS_FILE.resolve()} not found: run stages from the DVC "
            "project root (where dvc.yaml and params.yaml are)"
        )
    params = yaml.safe_load(PARAMS_FILE.read_text()) or {}
    return params if section is None else params.get(section, {})


def fail(message: str) -> NoReturn:
    """End a stage with a clear message and a non-zero exit, so `dvc repro` stops there."""
    raise SystemExit(f"error: {message}")


def label_studio_target(params: dict[str, Any], stage: str) -> tuple[str, str, int]:
    """(URL, API key, project id) of the Label Studio a stage talks to. The project comes
    from params.yaml alone, so that dvc.lock records which project's data a run used; the
    URL may come from LABEL_STUDIO_URL, the key only from LABEL_STUDIO_API_KEY (a secret
    has no place in params)."""
    section = params.get("labelstudio", {})
    url = os.environ.get("LABEL_STUDIO_URL") or section.get("url")
    api_key = os.environ.get("LABEL_STUDIO_API_KEY")
    project = int(section.get("project") or 0)
    if not url or not api_key or not project:
        fail(
            f"{stage} needs LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY and params.yaml "
            "labelstudio.project"
        )
    return url, api_key, project


def open_label_studio(url: str, api_key: str, project: int, stage: str,
                      params: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(SDK client, project) for a stage, or its end with one line naming the fix (a wrong
    token, an unknown project, a server unreachable for params.yaml's
    `labelstudio.retry_for` seconds)."""
    give_up_after = float((params or {}).get("labelstudio", {}).get("retry_for", 120))
    from backend.labelstudio.connect import LabelStudioError, open_project

    try:
        return open_project(url, api_key, project, stage, give_up_after)
    except LabelStudioError as exc:
        fail(str(exc))


CODE_ROOTS = ("backend", "pipelines")


def code_sha256(stage: str) -> str | None:
    """SHA-256 of the source a stage declares in dvc.yaml (its deps under backend/ and
    pipelines/), for a stage that must tell a code change from a re-run that changes
    nothing; None outside a DVC project."""
    try:
        stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    except (OSError, KeyError, TypeError):
        return None
    digest = hashlib.sha256()
    for dep in stages.get(stage, {}).get("deps", []):
        root = Path(dep)
        if root.parts[0] not in CODE_ROOTS:
            continue
        for file in sorted([root] if root.is_file() else root.rglob("*.py")):
            digest.update(f"{file}\n".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()
