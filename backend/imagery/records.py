"""The result records `predict` and `prelabel --images` write (image, width, height,
detections with `class_id`), as the output formats read them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class Counting(Protocol):
    """How detections become a survey's counts (backend.counts.Counting): the score a
    detection of a class needs to count, the one number for formats that hold one, and the
    calibrated estimate (mean, standard deviation) and 95% bounds where there is one."""

    fallback: float

    def of(self, class_id: int) -> float: ...

    def method(self, class_id: int) -> str: ...

    def estimate(self, class_id: int, counted: int, images: int
                 ) -> tuple[float, float] | None: ...

    def bounds(self, class_id: int, counted: int, images: int, counted_all: int
               ) -> tuple[float, float, float] | None: ...


def class_names(labels: list[str] | None, records: Sequence[dict[str, Any]]) -> list[str]:
    """The model's labels, then `class<i>` for every class found beyond them (all of them,
    for a model brought without labels)."""
    found = max((d["class_id"] for r in records for d in r.get("detections") or []), default=-1)
    names = list(labels or [])
    return names + [f"class{i}" for i in range(len(names), found + 1)]
