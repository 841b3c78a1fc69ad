"""Results in the MegaDetector batch output format (1.4), which Timelapse and the other
camera-trap tools open: https://lila.science/megadetector-output-format.

Boxes are [x_min, y_min, width, height] as fractions of the image; categories are
string-formatted integers, class id + 1 as MegaDetector numbers its own ("1": animal). Every
detection the model kept is written, as MegaDetector does, and `typical_detection_threshold`
tells the tools where to start. An image that could not be read has a `failure` and
`detections` null; an image with nothing found has an empty list.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any

from ..files import write_atomically
from .records import class_names

FORMAT_VERSION = "1.4"


def document(
    records: Sequence[dict[str, Any]],
    labels: list[str] | None,
    detector: str,
    threshold: float,
    base: Path | None = None,
) -> dict[str, Any]:
    """`records` as `predict` writes them (image, width, height, detections with pixel
    boxes [x0, y0, x1, y1], or an `error`); files are written relative to `base` when they
    lie under it (Timelapse reads them relative to the folder the results file is in)."""
    names = class_names(labels, records)
    return {
        "info": {
            "format_version": FORMAT_VERSION,
            "detector": detector,
            "detection_completion_time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "detector_metadata": {"typical_detection_threshold": threshold},
        },
        "detection_categories": {str(i + 1): name for i, name in enumerate(names)},
        "images": [_image(record, base) for record in records],
    }


def write(path: Path, records: Sequence[dict[str, Any]], labels: list[str] | None,
          detector: str, threshold: float) -> None:
    base = path.parent.resolve()
    write_atomically(path, json.dumps(
        document(records, labels, detector, threshold, base), indent=1) + "\n")


def _image(record: dict[str, Any], base: Path | None) -> dict[str, Any]:
    file = _relative(record["image"], base)
    if "error" in record:
        return {"file": file, "failure": str(record["error"]), "detections": None}
    width, height = record["width"], record["height"]
    detections = [
        {
            "category": str(d["class_id"] + 1),
            "conf": round(float(d["score"]), 4),
            "bbox": _normalised(d["box"], width, height),
        }
        for d in record["detections"]
    ]
    return {"file": file, "max_detection_conf": max((d["conf"] for d in detections), default=0.0),
            "detections": detections}


def _normalised(box: Sequence[float], width: int, height: int) -> list[float]:
    """Pixel corners -> [x, y, w, h] as fractions of the image, the box clipped to it."""
    x0, y0, x1, y1 = (min(max(v / size, 0.0), 1.0)
                      for v, size in zip(box, (width, height, width, height), strict=True))
    return [round(x0, 4), round(y0, 4), round(x1 - x0, 4), round(y1 - y0, 4)]


def _relative(image: str, base: Path | None) -> str:
    """A local file under `base` as a relative POSIX path; anything else as given."""
    if base is None or "://" in image:
        return image
    path = Path(image).resolve()
    return path.relative_to(base).as_posix() if path.is_relative_to(base) else (
        PurePath(image).as_posix()
    )
