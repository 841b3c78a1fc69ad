"""Results as a COCO file, with scores: for pycocotools and the tools that read COCO."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import write_atomically
from .records import class_names


def write(path: Path, records: Sequence[dict[str, Any]], labels: list[str] | None,
          detector: str) -> None:
    """All detections as COCO: `info`, `images`, `categories` and `annotations` carrying
    `score`, so pycocotools reads it as a dataset and its annotations as results. Images
    that failed are left out (COCO has no place for a failure; the JSON Lines has it)."""
    names = class_names(labels, records)
    coco: dict[str, Any] = {
        "info": {"description": "tridentloop detections", "version": detector,
                 "date_created": time.strftime("%Y-%m-%d %H:%M:%S")},
        "images": [],
        "annotations": [],
        "categories": [{"id": i, "name": n} for i, n in enumerate(names)],
    }
    for image_id, record in enumerate((r for r in records if "error" not in r), start=1):
        coco["images"].append(
            {
                "id": image_id,
                "file_name": record["image"],
                "width": record["width"],
                "height": record["height"],
                "uncertainty": record.get("uncertainty"),
            }
        )
        for det in record["detections"]:
            x0, y0, x1, y1 = det["box"]
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": det["class_id"],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "score": det["score"],
                    "iscrowd": 0,
                }
            )
    write_atomically(path, json.dumps(coco) + "\n")
