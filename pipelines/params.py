"""params.yaml, the one place a stage's settings come from (DVC tracks it per stage)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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


def fail(message: str) -> None:
    """End a stage with a clear message and a non-zero exit, so `dvc repro` stops there."""
    raise SystemExit(f"error: {message}")
