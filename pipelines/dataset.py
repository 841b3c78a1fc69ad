"""The training images of a split, decoded when a step asks for one (in a DataLoader
worker), never all at once: 1,000 frames of 6000 x 4000 would be 72 GB decoded, while
training holds workers x batch of them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from backend.detection.training import Sample
from backend.imagery.images import load_image


class StreamedSamples(Sequence[Sample]):
    """Training samples of a COCO split: boxes in pixels (x0, y0, x1, y1) and class ids held
    (they are small), each image decoded from `images_dir` when its sample is read."""

    def __init__(self, coco: dict[str, Any], images_dir: str | Path) -> None:
        self.images_dir = Path(images_dir)
        self.files = [image["file_name"] for image in coco["images"]]
        by_image: dict[int, list[list[float]]] = {}
        classes: dict[int, list[int]] = {}
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            by_image.setdefault(ann["image_id"], []).append([x, y, x + w, y + h])
            classes.setdefault(ann["image_id"], []).append(ann["category_id"])
        self.boxes = [np.array(by_image.get(im["id"], []), np.float32).reshape(-1, 4)
                      for im in coco["images"]]
        self.classes = [np.array(classes.get(im["id"], []), np.int64) for im in coco["images"]]

    def __len__(self) -> int:
        return len(self.files)

    @overload
    def __getitem__(self, index: int) -> Sample: ...
    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...

    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        image = load_image(self.images_dir / self.files[index])
        return Sample(image, self.boxes[index], self.classes[index])
