"""A deployable model on disk: `config.yaml` + `model_final.pth` + `labels.txt` (+ optional
`model.json` with version, metrics and lineage). Serving, batch jobs and the registry all
open models through this one shape."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .detection.predictor import Predictor

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model_final.pth"
LABELS_FILE = "labels.txt"
METADATA_FILE = "model.json"


# A forward pass that proves the weights load and run, at a fraction of a full tile's cost.
_SMOKE_TEST = {"INPUT.MIN_SIZE_TEST": 64, "INPUT.MAX_SIZE_TEST": 64,
               "MODEL.RPN.POST_NMS_TOPK_TEST": 8}


class ModelDirError(ValueError):
    """A model directory that lacks a file or holds an inconsistent one."""


def read_labels(path: str | Path) -> list[str]:
    """Class names in class-id order, one per line; blank lines and `#` comments skipped."""
    lines = Path(path).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@dataclass
class ModelDir:
    path: Path
    labels: list[str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> ModelDir:
        path = Path(path)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (path / name).is_file():
                raise ModelDirError(f"model directory {path} has no {name}")
        labels = read_labels(path / LABELS_FILE) if (path / LABELS_FILE).is_file() else None
        metadata: dict[str, Any] = {}
        if (path / METADATA_FILE).is_file():
            try:
                metadata = json.loads((path / METADATA_FILE).read_text())
            except json.JSONDecodeError as exc:
                raise ModelDirError(f"{path / METADATA_FILE}: not valid JSON ({exc})") from exc
        return cls(path, labels, metadata)

    @property
    def version(self) -> str:
        return str(self.metadata.get("version") or self.path.resolve().name)

    def predictor(self, overrides: dict[str, Any] | None = None, **kwargs: Any) -> Predictor:
        predictor = Predictor.from_files(
            self.path / CONFIG_FILE, self.path / WEIGHTS_FILE, overrides, **kwargs
        )
        num_classes = predictor.cfg.roi_heads.num_classes
        if self.labels is not None and len(self.labels) != num_classes:
            raise ModelDirError(
                f"{self.path / LABELS_FILE} names {len(self.labels)} classes but the config "
                f"has MODEL.ROI_HEADS.NUM_CLASSES={num_classes}"
            )
        return predictor

    def validate(self) -> None:
        """Raise unless the config, weights and labels load together and a forward pass on a
        generated image runs: what a server needs before it may switch to this model."""
        predictor = self.predictor(_SMOKE_TEST, device="cpu")
        predictor.predict([np.full((64, 64, 3), 127, np.uint8)])


def write_model_dir(
    dest: str | Path,
    config_yaml: str,
    state_dict: dict[str, torch.Tensor],
    labels: list[str],
    metadata: dict[str, Any],
) -> ModelDir:
    """Write a complete model directory atomically: built in a temp dir beside `dest`, then
    renamed, so a reader never sees half a model. An existing `dest` is refused."""
    dest = Path(dest)
    if dest.exists():
        raise ModelDirError(f"{dest} already exists; model directories are never overwritten")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        (tmp / CONFIG_FILE).write_text(config_yaml)
        torch.save({"model": state_dict}, tmp / WEIGHTS_FILE)
        (tmp / LABELS_FILE).write_text("".join(f"{name}\n" for name in labels))
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ModelDir.open(dest)
