"""The result records `predict` and `prelabel --images` write (image, width, height,
detections with `class_id`), as the output formats read them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class Thresholds(Protocol):
    """The score a detection of a class needs to count (backend.thresholds.ScoreThresholds),
    and the one number for formats that hold one."""

    fallback: float

    def of(self, class_id: int) -> float: ...


def class_names(labels: list[str] | None, records: Sequence[dict[str, Any]]) -> list[str]:
    """The model's labels, then `class<i>` for every class found beyond them (all of them,
    for a model brought without labels)."""
    found = max((d["class_id"] for r in records for d in r.get("detections") or []), default=-1)
    names = list(labels or [])
    return names + [f"class{i}" for i in range(len(names), found + 1)]
