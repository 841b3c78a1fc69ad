"""The dataset format between stages: COCO detection JSON plus content-addressed images.

Image ids are Label Studio task ids, so a split by id is stable across exports.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from backend.files import write_atomically


def read_coco(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def write_json(path: str | Path, data: Any, compact: bool = False) -> None:
    """Deterministic JSON (sorted keys), so that an unchanged dataset hashes the same;
    `compact` for what only the next run reads (json's C encoder: no indent)."""
    layout: dict[str, Any] = {"separators": (",", ":")} if compact else {"indent": 1}
    write_atomically(path, json.dumps(data, sort_keys=True, **layout) + "\n")


def category_names(coco: dict[str, Any]) -> list[str]:
    """Class names in class-id order (category ids are 0..K-1)."""
    return [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]


def subset(coco: dict[str, Any], image_ids: set[int]) -> dict[str, Any]:
    return {
        "images": [im for im in coco["images"] if im["id"] in image_ids],
        "annotations": [a for a in coco["annotations"] if a["image_id"] in image_ids],
        "categories": coco["categories"],
    }


def content_name(data: bytes, suffix: str) -> str:
    return hashlib.sha256(data).hexdigest()[:32] + suffix


def dataset_hash(coco_path: str | Path) -> str:
    """Identifies a dataset version: the annotations file names every image by content."""
    return hashlib.sha256(Path(coco_path).read_bytes()).hexdigest()[:16]
