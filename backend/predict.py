"""`tridentloop predict`: image files -> JSON Lines of detections, one line per image.

A file that cannot be read gets a line with an `error` and the run goes on with the rest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm import tqdm

from .detection.predictor import Predictor
from .detection.structures import Detections
from .detection.tiling import TilingOptions
from .imagery.exports import Exports
from .imagery.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_SCALING,
    ImageError,
    PixelScaling,
)
from .imagery.overlay import draw_detections
from .imagery.raster import WindowedRaster, open_image

log = logging.getLogger(__name__)


def detection_records(det: Detections, labels: list[str] | None) -> list[dict[str, Any]]:
    return [
        {
            "box": [float(v) for v in box],
            "score": float(score),
            "class_id": int(cls),
            "label": labels[int(cls)] if labels and int(cls) < len(labels) else None,
        }
        for box, score, cls in zip(
            det.boxes.tolist(), det.scores.tolist(), det.classes.tolist(), strict=True
        )
    ]


def _overlay(image: np.ndarray | WindowedRaster, det: Detections, labels: list[str] | None,
             path: Path) -> None:
    """Draw the boxes on the image; a raster too large to hold whole gets none, with a
    warning (its detections are in the results all the same)."""
    try:
        draw_detections(np.asarray(image), det, labels, path)
    except ImageError as exc:
        log.warning("no overlay: %s", exc)


@dataclass
class PredictSummary:
    images: int = 0
    failed: int = 0
    detections: int = 0


def run_predict(
    images: Iterable[str],
    predictor: Predictor,
    output: TextIO,
    tiling: TilingOptions | None,
    labels: list[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    scaling: PixelScaling = DEFAULT_SCALING,
    progress: bool = True,
    overlays: Path | None = None,
    exports: Exports | None = None,
    detector: str = "tridentloop",
) -> PredictSummary:
    """Write one JSON line per image; with `overlays`, also a PNG of each image's boxes;
    with `exports`, the result files ecologists' tools read, at the end (named `detector`)."""
    summary = PredictSummary()
    paths = list(images)
    kept: list[dict[str, Any]] = []
    keep = kept.append if exports is not None and exports.wanted else (lambda _record: None)
    for path in tqdm(paths, desc="predict", unit="img", disable=not progress or len(paths) < 2):
        summary.images += 1
        try:  # a raster read by windows may fail in the middle: the same report
            image = open_image(path, max_pixels=max_pixels, scaling=scaling)
            det = predictor.detect(image, tiling)
        except ImageError as exc:
            summary.failed += 1
            log.error("%s", exc)
            failure = {"image": path, "error": exc.reason}
            output.write(json.dumps(failure) + "\n")
            keep(failure)
            continue
        summary.detections += len(det)
        if overlays is not None:
            _overlay(image, det, labels, overlays / (Path(path).stem + ".png"))
        record = {
            "image": path,
            "width": image.shape[1],
            "height": image.shape[0],
            "detections": detection_records(det, labels),
        }
        output.write(json.dumps(record) + "\n")
        output.flush()
        keep(record)
    if kept:
        exports.write(kept, labels, detector)
    return summary
