"""PNG overlays of detections, so a person can check pre-labels at a glance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..detection.structures import Detections

PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
)


def draw_detections(
    image: np.ndarray,
    det: Detections,
    labels: list[str] | None,
    path: str | Path,
    max_side: int = 2000,
) -> None:
    """Boxes coloured by class with `label score`, downscaled so the long side is at most
    `max_side` (survey images are far too large to look at whole)."""
    canvas = Image.fromarray(image)
    scale = min(1.0, max_side / max(canvas.size))
    if scale < 1.0:
        canvas = canvas.resize((round(canvas.width * scale), round(canvas.height * scale)))
    draw = ImageDraw.Draw(canvas)
    for box, score, cls in zip(
        det.boxes.tolist(), det.scores.tolist(), det.classes.tolist(), strict=True
    ):
        colour = PALETTE[cls % len(PALETTE)]
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        name = labels[cls] if labels and cls < len(labels) else str(cls)
        draw.text((x0 + 1, max(0, y0 - 11)), f"{name} {score:.2f}", fill=colour)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
