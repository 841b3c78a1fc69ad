"""Detections -> Label Studio prediction results (`rectanglelabels` in percent of the
original image), checked against the label config before they leave the backend, because
Label Studio stores whatever it is sent."""

from __future__ import annotations

from typing import Any

from ..detection.structures import Detections
from ..thresholds import ScoreThresholds
from .label_config import LabelConfig, RectangleControl

_EPS = 1e-6


class ResultError(ValueError):
    """A result that does not fit the project's label config."""


def rectangle_region(box: list[float], label: str, width: int, height: int,
                     from_name: str = "label", to_name: str = "image") -> dict[str, Any]:
    """One `rectanglelabels` region for a pixel box (x0, y0, x1, y1), in percent."""
    x0, y0, x1, y1 = box
    return {
        "from_name": from_name,
        "to_name": to_name,
        "type": "rectanglelabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {
            "x": 100.0 * x0 / width,
            "y": 100.0 * y0 / height,
            "width": 100.0 * (x1 - x0) / width,
            "height": 100.0 * (y1 - y0) / height,
            "rotation": 0,
            "rectanglelabels": [label],
        },
    }


def rectangle_results(
    det: Detections,
    width: int,
    height: int,
    control: RectangleControl,
    class_map: dict[int, str],
    thresholds: ScoreThresholds,
) -> list[dict[str, Any]]:
    """One region per detection of a mapped class at or above its class's threshold, best
    first."""
    results = []
    shown = thresholds.offered(det).tolist()
    for box, score, cls, offered in zip(det.boxes.tolist(), det.scores.tolist(),
                                        det.classes.tolist(), shown, strict=True):
        label = class_map.get(int(cls))
        if label is None or not offered:
            continue
        region = rectangle_region(box, label, width, height, control.from_name, control.to_name)
        results.append({**region, "score": float(score)})
    return results


def prediction(results: list[dict[str, Any]], model_version: str, score: float) -> dict[str, Any]:
    """A task's answer; its score is the image's uncertainty (backend.uncertainty), so
    annotators sorting the Data Manager by prediction score see the doubtful ones first."""
    return {"result": results, "score": float(score), "model_version": model_version}


def validate(results: list[dict[str, Any]], config: LabelConfig) -> None:
    """Raise ResultError unless Label Studio's own validation (label_studio_sdk) accepts
    every region for the project's config and every box lies inside its image."""
    problems = config.problems(results)
    for region in results:
        value = region.get("value", {})
        x, y, w, h = (value.get(k, 0) for k in ("x", "y", "width", "height"))
        if min(x, y) < -_EPS or w <= 0 or h <= 0 or x + w > 100 + _EPS or y + h > 100 + _EPS:
            problems.append(f"box {x:.3f},{y:.3f} {w:.3f}x{h:.3f}% is outside the image")
    if problems:
        raise ResultError("; ".join(problems[:3]))
