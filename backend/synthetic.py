"""Generated survey-like scenes: small animals on textured ground, with exact ground truth.

No dataset can be downloaded here, so tests and the demo make their own: each class has a
distinct body shape and colour so that a tiny model learns it in a few hundred steps.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("elephant", "zebra", "bird")

# (body colour RGB, (min, max) body length in px, length / width ratio)
_LOOKS = {
    "elephant": ((128, 128, 136), (40, 60), 1.5),
    "zebra": ((238, 238, 232), (26, 38), 2.2),
    "bird": ((196, 40, 36), (16, 22), 1.0),
}


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    boxes: np.ndarray  # (K, 4) float32 x0 y0 x1 y1
    classes: np.ndarray  # (K,) int64 index into CLASSES


def ground(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Savanna-like texture: smooth patches of soil and grass plus fine grain."""
    coarse = rng.uniform(0, 1, size=(max(2, height // 64), max(2, width // 64), 1))
    soil = np.array([150, 120, 80]) * (1 - coarse) + np.array([110, 130, 60]) * coarse
    base = Image.fromarray(soil.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.normal(0, 10, size=(height, width, 1))
    pixels = np.asarray(base, dtype=np.float64) + grain
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(0.6)
    )


def survey_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    animals: int,
    classes: tuple[str, ...] = CLASSES,
    frequencies: Sequence[float] | None = None,
) -> Scene:
    """A scene with about `animals` non-overlapping animals (fewer if space runs out), of
    classes drawn uniformly or with the given relative `frequencies` (rare species)."""
    image = ground(rng, height, width)
    draw = ImageDraw.Draw(image)
    boxes: list[list[float]] = []
    labels: list[int] = []
    for _ in range(animals * 20):
        if len(boxes) == animals:
            break
        cls = (int(rng.integers(len(classes))) if frequencies is None
               else int(rng.choice(len(classes), p=np.asarray(frequencies) / sum(frequencies))))
        colour, (low, high), ratio = _LOOKS[classes[cls]]
        length = float(rng.uniform(low, high))
        w, h = (length, length / ratio) if rng.random() < 0.5 else (length / ratio, length)
        x0 = float(rng.uniform(2, width - w - 2))
        y0 = float(rng.uniform(2, height - h - 2))
        box = [x0, y0, x0 + w, y0 + h]
        if any(_overlaps(box, other, margin=4) for other in boxes):
            continue
        shade = tuple(int(c + rng.integers(-12, 13)) for c in colour)
        draw.ellipse([x0 + 2, y0 + 3, x0 + w + 2, y0 + h + 3], fill=(60, 55, 40))  # shadow
        draw.ellipse(box, fill=shade)
        if classes[cls] == "zebra":
            _stripes(draw, box, w > h)
        boxes.append([x0, y0, x0 + w + 2, y0 + h + 3])  # the box includes the shadow
        labels.append(cls)
    return Scene(
        np.asarray(image).copy(),
        np.array(boxes, dtype=np.float32).reshape(-1, 4),
        np.array(labels, dtype=np.int64),
    )


def _overlaps(a: list[float], b: list[float], margin: float) -> bool:
    return (
        a[0] < b[2] + margin
        and b[0] < a[2] + margin
        and a[1] < b[3] + margin
        and b[1] < a[3] + margin
    )


def _stripes(draw: ImageDraw.ImageDraw, box: list[float], horizontal: bool) -> None:
    x0, y0, x1, y1 = box
    steps = np.linspace(x0 + 2, x1 - 2, 5) if horizontal else np.linspace(y0 + 2, y1 - 2, 5)
    for s in steps:
        line = [s, y0 + 1, s, y1 - 1] if horizontal else [x0 + 1, s, x1 - 1, s]
        draw.line(line, fill=(20, 20, 20), width=2)


# A Label Studio project for the generated scenes: boxes labelled with their classes.
LABEL_CONFIG = (
    "<View><Image name='image' value='$image'/><RectangleLabels name='label' "
    "toName='image'>"
    + "".join(f"<Label value='{c}'/>" for c in CLASSES)
    + "</RectangleLabels></View>"
)


def coco_of(scenes: Sequence[tuple[str, np.ndarray, np.ndarray, tuple[int, int]]]
            ) -> dict[str, Any]:
    """A COCO detection dataset of generated scenes, given as (file name, boxes (x0, y0, x1,
    y1), classes, (height, width)); image ids are positions, categories CLASSES."""
    coco: dict[str, Any] = {"images": [], "annotations": [],
                            "categories": [{"id": i, "name": n} for i, n in enumerate(CLASSES)]}
    for i, (name, boxes, classes, (height, width)) in enumerate(scenes):
        coco["images"].append({"id": i, "file_name": name, "width": width, "height": height})
        for box, cls in zip(boxes.tolist(), classes.tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i,
                                        "category_id": cls, "bbox": [box[0], box[1], w, h],
                                        "area": w * h, "iscrowd": 0})
    return coco


def png_bytes(image: np.ndarray) -> bytes:
    """An image as the bytes of a PNG file, to upload to Label Studio as a user would."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
