"""The model a server answers with: one fixed model directory, or the registry's `current`
version, hot-reloaded when the pointer changes. Each version runs by its own recipe (with
the server's flags laid over it), so a switch to a model trained on other tiles changes
the tiling too.

A reload happens in the request thread that notices the change (never on the event loop);
requests already running keep the model they started with, so a switch never fails a
request. A version that does not load is logged and the previous one keeps serving. A
served model's `model.json` rewritten in place (`tridentloop calibrate`) is noticed the same
way, and its new thresholds are served without reloading the weights.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..detection.predictor import Predictor
from ..detection.tiling import TilingOptions
from ..model_dir import METADATA_FILE, ModelDir
from ..recipe import RecipeOverrides
from ..registry import Registry
from ..thresholds import ScoreThresholds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    version: str
    predictor: Predictor
    labels: list[str]
    tiling: TilingOptions | None  # None: each image whole
    thresholds: ScoreThresholds
    triage: float | None  # frames whose best score is under it are likely empty
    path: Path  # the model directory, whose model.json may be re-calibrated in place
    metadata_stamp: tuple[int, int] | None


def metadata_stamp(path: Path) -> tuple[int, int] | None:
    """(inode, mtime_ns) of a model directory's model.json: calibrate rewrites it atomically."""
    try:
        stat = (path / METADATA_FILE).stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


class ModelSource:
    """The model a server answers with: a model directory, or a registry's current version,
    reloaded when the registry moves. A watcher thread looks at the registry's pointer every
    `watch_seconds`, so `/health` and `/setup` name a newly deployed version within seconds,
    not only after the next `/predict`."""

    def __init__(
        self,
        model_dir: Path | None = None,
        registry: Registry | None = None,
        recipe_overrides: RecipeOverrides | None = None,
        overrides: dict[str, Any] | None = None,
        watch_seconds: float = 2.0,
        **predictor_kwargs: Any,
    ) -> None:
        if (model_dir is None) == (registry is None):
            raise ValueError("serve needs exactly one of --model DIR or --registry DIR")
        self.registry = registry
        self.recipe_overrides = recipe_overrides or RecipeOverrides()
        self.overrides = overrides or {}
        self.predictor_kwargs = predictor_kwargs
        self._lock = threading.Lock()
        self._stamp = registry.pointer_stamp() if registry else None
        if model_dir is not None:
            self._current = self._load(ModelDir.open(model_dir), None)
        else:
            assert registry is not None
            self._current = self._load(registry.current(), registry.current_name())
        self._stop = threading.Event()
        threading.Thread(target=self._watch, args=(watch_seconds,), daemon=True,
                         name="model-source-watch").start()

    def _watch(self, seconds: float) -> None:
        """Looks at the registry's pointer and the served model.json; a fixed model
        directory is watched too, for its model.json."""
        while not self._stop.wait(seconds):
            self.get()

    def close(self) -> None:
        self._stop.set()

    def _load(self, model_dir: ModelDir, name: str | None) -> LoadedModel:
        if model_dir.labels is None:
            raise ValueError(
                f"{model_dir.path} has no labels.txt: Label Studio needs class "
                "names to map to its labels"
            )
        stamp = metadata_stamp(model_dir.path)  # before reading it: a later edit is noticed
        predictor = model_dir.predictor(self.overrides, **self.predictor_kwargs)
        version = name or model_dir.version
        tiling = self.recipe_overrides.apply(model_dir.recipe, version)
        thresholds = model_dir.thresholds
        log.info("serving model %s from %s; score thresholds %s", version, model_dir.path,
                 thresholds.describe(model_dir.labels))
        return LoadedModel(version, predictor, model_dir.labels, tiling, thresholds,
                           model_dir.triage_threshold, model_dir.path, stamp)

    def _recalibrated(self, model: LoadedModel) -> LoadedModel:
        """The same weights with the thresholds (score, triage) of a model.json rewritten in
        place."""
        stamp = metadata_stamp(model.path)
        if stamp == model.metadata_stamp:
            return model
        try:
            calibrated = ModelDir.open(model.path)
            thresholds, triage = calibrated.thresholds, calibrated.triage_threshold
        except ValueError:
            log.exception("could not read %s; keeping its thresholds", model.path)
            return replace(model, metadata_stamp=stamp)
        log.info("model %s re-calibrated: score thresholds %s", model.version,
                 thresholds.describe(model.labels))
        return replace(model, thresholds=thresholds, triage=triage, metadata_stamp=stamp)

    def current(self) -> LoadedModel:
        """The model being served, without looking at the registry: never blocks, so the
        event loop (/health) may call it."""
        return self._current

    def get(self) -> LoadedModel:
        """The model to answer this request with, reloading first if the registry moved.
        The stamp moves only once the new version is loaded: a request that arrives while
        the watcher loads it waits for the lock instead of answering with the old one."""
        if self.registry is not None and self.registry.pointer_stamp() != self._stamp:
            with self._lock:
                stamp = self.registry.pointer_stamp()
                if stamp != self._stamp:
                    try:
                        name = self.registry.current_name()
                        assert name is not None
                        self._current = self._load(self.registry.open(name), name)
                    except Exception:
                        log.exception(
                            "could not load the registry's new current version; still serving %s",
                            self._current.version,
                        )
                    self._stamp = stamp  # a version that fails is not retried every request
        if metadata_stamp(self._current.path) != self._current.metadata_stamp:
            with self._lock:
                self._current = self._recalibrated(self._current)
        return self._current
