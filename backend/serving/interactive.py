"""Label Studio's smart tools answered by the model: "detect here, closer" and "box this
animal" (interactive pre-annotation, `params.context` of `/predict`; the protocol as Label
Studio 1.23's code shows it is in docs/serving.md).

- **Smart rectangle**: the drawn region, plus a margin of a quarter of its size, is cut from
  the full-resolution image and run zoomed to the model's working scale (a tiled model: the
  crop enlarged until its long side fills a tile, at most 4x, so small animals get pixels; a
  whole-image model: the crop resized as DefaultPredictor resizes an image). Those boxes and
  the image's normal-scale boxes are merged (class-aware NMS at 0.5) and the ones whose
  centre lies in the region are returned, in full-image coordinates.
- **Smart keypoint**: a positive click returns the single best box containing it (from the
  normal pass and a zoomed pass around the point); a box containing a negative click
  (Alt-click) is never returned. Nothing found is an empty result, not an error.
- A rotated image (`image_rotation`) or rotated rectangle (`value.rotation`) is refused with
  a 400 naming the rotation: its percentages would be read in the wrong frame. A full
  inference queue is a 503 with Retry-After; an image that cannot be fetched (or is not an
  image) a 502, one that cannot be used (too many pixels) a 422, each naming the image.

Decisions: the label chosen on the smart tool restricts the classes returned when it maps
to a model class (an annotator who picks "Zebra" and circles a herd wants zebras); a label
no model class maps to returns every class. Candidates are shown from a score of
`interactive_threshold` (0.2 by default), lower than pre-labels' thresholds and even for a
class whose pre-labels are not offered: pre-labels are offered unasked, where every wrong
box costs a deletion, but here the annotator asked about one spot and accepts or rejects
each suggestion in one click.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..detection.boxes import nms_per_image
from ..detection.structures import Detections
from ..detection.tiling import TilingOptions
from ..labelstudio.label_config import RectangleControl
from ..labelstudio.results import rectangle_region

MAX_PROMPTS = 64  # smart regions in one context: more is not an annotator's
MAX_ZOOM = 4.0
MARGIN = 0.25  # of the region's size, on each side
POINT_WINDOW = 0.5  # a click's zoomed window: half a tile (or of the image's short side)
MERGE_IOU = 0.5
TYPES = {"rectanglelabels": "rectangle", "keypointlabels": "point"}


class ContextError(ValueError):
    """A smart-tool context that does not parse, naming what is wrong."""


@dataclass(frozen=True)
class Prompt:
    kind: str  # "rectangle" or "point"
    to_name: str
    label: str | None
    x: float  # percent of the image, as Label Studio sends them
    y: float
    width: float = 0.0
    height: float = 0.0
    positive: bool = True

    def pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in the image's pixels; a point has no extent."""
        x0, y0 = self.x * width / 100, self.y * height / 100
        return x0, y0, x0 + self.width * width / 100, y0 + self.height * height / 100


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ContextError(f"context {name} is {value!r}, not a number")
    if not math.isfinite(value) or not low <= value <= high:
        raise ContextError(f"context {name}={value!r} is outside {low:g}-{high:g}")
    return float(value)


def parse_context(context: Any) -> list[Prompt]:
    """The smart regions of `params.context`; raises ContextError on anything else."""
    if not isinstance(context, dict) or not isinstance(context.get("result"), list):
        raise ContextError("context needs a 'result' list of smart regions")
    items = context["result"]
    if not items or len(items) > MAX_PROMPTS:
        raise ContextError(f"context has {len(items)} regions; 1 to {MAX_PROMPTS} expected")
    return [_prompt(item, i) for i, item in enumerate(items)]


def _prompt(item: Any, i: int) -> Prompt:
    if not isinstance(item, dict) or item.get("type") not in TYPES:
        kind = item.get("type") if isinstance(item, dict) else item
        raise ContextError(f"context region {i} has type {kind!r}; smart tools here are "
                           f"{sorted(TYPES)}")
    value, to_name = item.get("value"), item.get("to_name")
    if not isinstance(value, dict) or not isinstance(to_name, str):
        raise ContextError(f"context region {i} needs a 'value' object and a 'to_name'")
    for name, turned in (("image_rotation", item.get("image_rotation")),
                         ("rotation", value.get("rotation"))):
        if turned not in (None, 0, 0.0):
            raise ContextError(
                f"context region {i}: {name}={turned!r}; smart tools here answer unrotated "
                "images and regions only (rotate the image back, or draw an upright box)")
    kind = TYPES[item["type"]]
    labels = value.get(item["type"]) or value.get("labels") or []
    if not isinstance(labels, list) or not all(isinstance(lbl, str) for lbl in labels):
        raise ContextError(f"context region {i}: {item['type']} must be a list of labels")
    x = _number(value.get("x"), f"region {i} x", 0, 100)
    y = _number(value.get("y"), f"region {i} y", 0, 100)
    positive = item.get("is_positive", True)
    if not isinstance(positive, bool):
        raise ContextError(f"context region {i}: is_positive must be true or false")
    if kind == "point":
        return Prompt(kind, to_name, labels[0] if labels else None, x, y, positive=positive)
    width = _number(value.get("width"), f"region {i} width", 0, 100 - x + 1e-6)
    height = _number(value.get("height"), f"region {i} height", 0, 100 - y + 1e-6)
    if width <= 0 or height <= 0:
        raise ContextError(f"context region {i} is an empty rectangle")
    return Prompt(kind, to_name, labels[0] if labels else None, x, y, width, height)


def zoom_for(crop: tuple[int, int], tiling: TilingOptions | None) -> float:
    """How much to enlarge a crop of (h, w): a tiled model's crop until its long side fills
    a tile (at most MAX_ZOOM); a whole-image model resizes any crop itself."""
    if tiling is None:
        return 1.0
    return min(MAX_ZOOM, max(1.0, tiling.tile_size / max(crop)))


def zoomed_window(image: np.ndarray, window: tuple[float, float, float, float],
                  tiling: TilingOptions | None,
                  detect: Callable[[np.ndarray], Detections]) -> Detections:
    """Detections of `window` (x0, y0, x1, y1 pixels) cut out and run zoomed, in the full
    image's pixels."""
    height, width = image.shape[:2]
    x0, y0 = max(0, int(window[0])), max(0, int(window[1]))
    x1, y1 = min(width, math.ceil(window[2])), min(height, math.ceil(window[3]))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return Detections.empty((height, width))
    crop = np.ascontiguousarray(image[y0:y1, x0:x1])
    zoom = zoom_for(crop.shape[:2], tiling)
    if zoom > 1.0:
        size = (round(crop.shape[1] * zoom), round(crop.shape[0] * zoom))
        crop = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.BILINEAR))
    found = detect(crop)
    scale = torch.tensor([crop.shape[1] / (x1 - x0), crop.shape[0] / (y1 - y0)] * 2)
    boxes = found.boxes / scale + torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
    return Detections(boxes, found.scores, found.classes, (height, width))


def _merged(parts: Sequence[Detections]) -> Detections:
    """Both scales' boxes, duplicates removed (class-aware NMS), best first."""
    det = Detections.cat(list(parts))
    if len(det) == 0:
        return det
    images = torch.zeros(len(det), dtype=torch.int64)
    keep = nms_per_image(det.boxes, det.scores, det.classes, images,
                         int(det.classes.max()) + 1, MERGE_IOU, -1)
    return det.select(keep)


def _margin_window(box: tuple[float, float, float, float]) -> tuple[float, ...]:
    x0, y0, x1, y1 = box
    mx, my = max(16.0, (x1 - x0) * MARGIN), max(16.0, (y1 - y0) * MARGIN)
    return x0 - mx, y0 - my, x1 + mx, y1 + my


def _point_window(x: float, y: float, image: np.ndarray,
                  tiling: TilingOptions | None) -> tuple[float, ...]:
    side = (tiling.tile_size if tiling else min(image.shape[:2])) * POINT_WINDOW
    return x - side / 2, y - side / 2, x + side / 2, y + side / 2


def _contains(det: Detections, x: float, y: float) -> torch.Tensor:
    b = det.boxes
    return (b[:, 0] <= x) & (x <= b[:, 2]) & (b[:, 1] <= y) & (y <= b[:, 3])


@dataclass(frozen=True)
class Target:
    """Where an answer goes: the box control on the prompted image and its class map."""

    control: RectangleControl
    class_map: dict[int, str]

    def classes_for(self, label: str | None) -> set[int]:
        """The model classes a chosen label restricts to (none: every mapped class)."""
        chosen = {c for c, name in self.class_map.items() if name == label}
        return chosen or set(self.class_map)


def answer(
    prompts: list[Prompt],
    image: np.ndarray,
    normal: Detections,
    target: Target,
    tiling: TilingOptions | None,
    detect: Callable[[np.ndarray], Detections],
    threshold: float,
) -> list[dict[str, Any]]:
    """Label Studio regions answering the smart regions drawn on one image."""
    height, width = image.shape[:2]
    negatives = [p.pixels(width, height)[:2] for p in prompts
                 if p.kind == "point" and not p.positive]
    regions: list[dict[str, Any]] = []
    for prompt in prompts:
        if prompt.kind == "point" and not prompt.positive:
            continue
        box = prompt.pixels(width, height)
        window = (_margin_window(box) if prompt.kind == "rectangle"
                  else _point_window(box[0], box[1], image, tiling))
        found = _merged([normal, zoomed_window(image, window, tiling, detect)])
        allowed = target.classes_for(prompt.label)
        keep = (found.scores >= threshold) & torch.tensor(
            [int(c) in allowed for c in found.classes.tolist()], dtype=torch.bool)
        for nx, ny in negatives:
            keep &= ~_contains(found, nx, ny)
        if prompt.kind == "rectangle":
            centres = (found.boxes[:, :2] + found.boxes[:, 2:]) / 2
            keep &= ((centres[:, 0] >= box[0]) & (centres[:, 0] <= box[2])
                     & (centres[:, 1] >= box[1]) & (centres[:, 1] <= box[3]))
            chosen = found.select(keep)
        else:
            keep &= _contains(found, box[0], box[1])
            chosen = found.select(torch.nonzero(keep)[:1, 0])  # the best (found is by score)
        regions += _regions(chosen, target, width, height)
    return regions


def _regions(det: Detections, target: Target, width: int, height: int) -> list[dict[str, Any]]:
    out = []
    for box, score, cls in zip(det.boxes.tolist(), det.scores.tolist(), det.classes.tolist(),
                               strict=True):
        label = target.class_map[int(cls)]
        region = rectangle_region(box, label, width, height, target.control.from_name,
                                  target.control.to_name)
        out.append({"id": secrets.token_urlsafe(8)[:10], **region, "score": float(score)})
    return out


def answer_task(
    prompts: list[Prompt],
    data: dict[str, Any],
    usable: Sequence[tuple[RectangleControl, dict[int, str]]],
    seen: Callable[[Any], tuple[np.ndarray, Detections]],
    detect: Callable[[np.ndarray], Detections],
    tiling: TilingOptions | None,
    threshold: float,
) -> list[dict[str, Any]]:
    """Every image's smart regions of one task answered: each prompted image is read once
    (`seen`: the image and its normal-scale detections) and its prompts answered against
    its box control; an image without a box control this model can fill gets nothing."""
    targets: dict[str, Target] = {}
    for control, class_map in usable:
        targets.setdefault(control.to_name, Target(control, class_map))
    regions: list[dict[str, Any]] = []
    for to_name in dict.fromkeys(p.to_name for p in prompts):
        target = targets.get(to_name)
        if target is None:
            continue
        image, normal = seen(data.get(target.control.data_key))
        regions += answer([p for p in prompts if p.to_name == to_name], image, normal,
                          target, tiling, detect, threshold)
    return regions
