"""Helpers for tests that run real servers: model directories, ports, readiness."""

from __future__ import annotations

import shutil
from pathlib import Path

from backend.labelstudio.local_server import wait_for
from backend.labelstudio.server import free_port, serve_in_thread

from .conftest import fixture_dir

__all__ = ["ANIMAL_CONFIG", "free_port", "make_model_dir", "serve_in_thread", "wait_for"]

LABELS = ["Elephant", "zebra", "BIRD"]

# The model's classes reach these labels three ways: same name, other case, predicted_values.
ANIMAL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Elephant"/><Label value="Zebra"/><Label value="Avian" predicted_values="bird"/>
  </RectangleLabels>
</View>"""


def make_model_dir(
    dest: Path, fixture: str = "faster_rcnn_R_50_FPN_1x", version: str | None = None
) -> Path:
    """A model directory from a detectron2 fixture, with class names."""
    dest.mkdir(parents=True)
    src = fixture_dir(fixture)
    shutil.copy(src / "config.yaml", dest / "config.yaml")
    shutil.copy(src / "model_final.pth", dest / "model_final.pth")
    (dest / "labels.txt").write_text("\n".join(LABELS) + "\n")
    if version:
        (dest / "model.json").write_text(f'{{"version": "{version}"}}\n')
    return dest
