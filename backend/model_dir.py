"""A deployable model on disk: `config.yaml` + `model_final.pth` + `labels.txt` (+ optional
`model.json` with version, lineage and the inference recipe). Serving, batch jobs, the
loop's stages and the registry all open models through this one shape, and ask it how the
model must be run."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .counts import TRIAGE_KEY, Counting
from .detection.checkpoint import read_state_dict
from .detection.config import DetectorConfig, config_from_yaml_text, dump_config, load_config
from .detection.predictor import Predictor
from .detection.tiling import TilingOptions
from .files import file_sha256, write_atomically
from .recipe import Recipe, describe, parse_recipe, recipe_json
from .thresholds import ScoreThresholds

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
    recipe: Recipe = None  # how the model must be run; None: whole, as DefaultPredictor

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
        return cls(path, labels, metadata, _stored_recipe(metadata, path / METADATA_FILE))

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE

    def update_metadata(self, updates: dict[str, Any]) -> None:
        """Merge `updates` into model.json, written atomically (the weights are untouched,
        so their SHA-256 still names them)."""
        self.metadata = {**self.metadata, **updates}
        write_atomically(self.path / METADATA_FILE,
                         json.dumps(self.metadata, indent=2, sort_keys=True) + "\n")

    @property
    def thresholds(self) -> ScoreThresholds:
        """The score each class needs to be offered (chosen on validation, or 0.5)."""
        return ScoreThresholds.of_model(self.metadata, self.labels)

    @property
    def counting(self) -> Counting:
        """How its detections become survey counts (calibrated on validation, or 0.5)."""
        return Counting.of_model(self.metadata, self.labels)

    @property
    def triage_threshold(self) -> float | None:
        """The image score under which a frame is likely empty (chosen on validation)."""
        threshold = (self.metadata.get(TRIAGE_KEY) or {}).get("threshold")
        return None if threshold is None else float(threshold)

    @property
    def config(self) -> DetectorConfig:
        return load_config(self.path / CONFIG_FILE)

    @property
    def version(self) -> str:
        return str(self.metadata.get("version") or self.path.resolve().name)

    def predictor(self, overrides: dict[str, Any] | None = None, **kwargs: Any) -> Predictor:
        """The model ready to run, with the mirrored views its recipe asks for; `"exact":
        true` in model.json asks for the exact mode (DeviceOptions.create) whatever the
        command says."""
        if self.metadata.get("exact"):
            kwargs["exact"] = True
        if self.recipe is not None:
            kwargs.setdefault("views", self.recipe.views)
        predictor = Predictor.from_files(
            self.path / CONFIG_FILE, self.weights, overrides, **kwargs
        )
        num_classes = predictor.cfg.roi_heads.num_classes
        if self.labels is not None and len(self.labels) != num_classes:
            raise ModelDirError(
                f"{self.path / LABELS_FILE} names {len(self.labels)} classes but the config "
                f"has MODEL.ROI_HEADS.NUM_CLASSES={num_classes}"
            )
        return predictor

    def summary(self) -> dict[str, Any]:
        """What `tridentloop model show` prints: how the model runs and where it came from."""
        lineage = {k: v for k, v in self.metadata.items() if k not in ("version", "recipe")}
        return {
            "path": str(self.path),
            "version": self.version,
            "classes": self.labels,
            "recipe": recipe_json(self.recipe),
            "runs": describe(self.recipe) + ("" if "recipe" in self.metadata
                                             else " (no recipe stored: the default)"),
            "lineage": lineage,
        }

    def validate(self) -> None:
        """Raise unless the config, weights and labels load together and a forward pass on a
        generated image runs: what a server needs before it may switch to this model."""
        predictor = self.predictor(_SMOKE_TEST, device="cpu")
        predictor.predict([np.full((64, 64, 3), 127, np.uint8)])


def _stored_recipe(metadata: dict[str, Any], where: Path) -> Recipe:
    """The recipe in model.json. A model our loop trained before recipes were stored ran
    tiled at its training crop size, and keeps doing so; any other model without one runs
    whole, as DefaultPredictor."""
    if "recipe" in metadata:
        return parse_recipe(metadata["recipe"], str(where))
    crop_size = (metadata.get("params") or {}).get("crop_size")
    return TilingOptions(tile_size=int(crop_size)) if crop_size else None


@contextmanager
def _building(dest: str | Path) -> Iterator[Path]:
    """A temp dir beside `dest`, renamed to `dest` when the block ends without error and
    removed when it fails: a reader never sees half a model. An existing `dest` is refused."""
    dest = Path(dest)
    if dest.exists():
        raise ModelDirError(f"{dest} already exists; model directories are never overwritten")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_files(
    root: Path,
    config_yaml: str,
    state_dict: dict[str, torch.Tensor],
    labels: list[str],
    metadata: dict[str, Any],
) -> None:
    (root / CONFIG_FILE).write_text(config_yaml)
    torch.save({"model": state_dict}, root / WEIGHTS_FILE)
    (root / LABELS_FILE).write_text("".join(f"{name}\n" for name in labels))
    _write_metadata(root, metadata)


def _write_metadata(root: Path, metadata: dict[str, Any]) -> None:
    (root / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def write_model_dir(
    dest: str | Path,
    config_yaml: str,
    state_dict: dict[str, torch.Tensor],
    labels: list[str],
    metadata: dict[str, Any],
) -> ModelDir:
    """Write a complete model directory atomically."""
    with _building(dest) as tmp:
        _write_files(tmp, config_yaml, state_dict, labels, metadata)
    return ModelDir.open(dest)


def copy_model_dir(source: ModelDir, dest: str | Path, metadata: dict[str, Any]) -> ModelDir:
    """The same config, weights and labels, byte for byte (so the weights' SHA-256 still
    names them), with new metadata; written atomically."""
    with _building(dest) as tmp:
        for name in (CONFIG_FILE, WEIGHTS_FILE, LABELS_FILE):
            if (source.path / name).is_file():
                shutil.copyfile(source.path / name, tmp / name)
        _write_metadata(tmp, metadata)
    return ModelDir.open(dest)


def init_model_dir(
    dest: str | Path,
    config: str | Path,
    weights: str | Path,
    labels: str | Path,
    recipe: Recipe,
    version: str | None = None,
) -> ModelDir:
    """A model directory from a user's detectron2 files (a config with its `_BASE_`s, a
    .pth or model-zoo .pkl checkpoint, class names), written only once it has loaded and
    run on a generated image. The config is stored resolved and the weights as plain
    tensors, so the directory stands alone and loads without trusting pickled objects."""
    names = read_labels(labels)
    config_yaml = dump_config(config)
    num_classes = config_from_yaml_text(config_yaml, str(config)).roi_heads.num_classes
    if len(names) != num_classes:
        raise ModelDirError(f"{labels} names {len(names)} classes but {config} has "
                            f"MODEL.ROI_HEADS.NUM_CLASSES={num_classes}")
    source_sha256 = file_sha256(weights)
    metadata = {
        "version": version or Path(dest).name,
        "recipe": recipe_json(recipe),
        "source": {"config": str(Path(config).resolve()),
                   "weights": str(Path(weights).resolve()), "weights_sha256": source_sha256,
                   "labels": str(Path(labels).resolve())},
    }
    with _building(dest) as tmp:
        _write_files(tmp, config_yaml, read_state_dict(weights), names, metadata)
        ModelDir.open(tmp).validate()
    return ModelDir.open(dest)
