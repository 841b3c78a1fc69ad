"""The result files a run writes at its end, beside its JSON Lines: one place that both
`predict` and `prelabel --images` ask, so the two write them alike."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import coco_results, counts, geojson, megadetector
from .records import Counting


@dataclass(frozen=True)
class Exports:
    megadetector: Path | None = None
    counts: Path | None = None
    counting: Counting | None = None  # what counts; MegaDetector's typical threshold
    geojson: Path | None = None
    coco: Path | None = None
    triage: float | None = None  # frames whose best score is below it are likely empty

    @property
    def wanted(self) -> bool:
        paths = (self.megadetector, self.counts, self.geojson, self.coco)
        return any(p is not None for p in paths)

    def write(self, records: Sequence[dict[str, Any]], labels: list[str] | None,
              detector: str) -> None:
        if self.megadetector is not None:
            assert self.counting is not None
            megadetector.write(self.megadetector, records, labels, detector,
                               self.counting.fallback)
        if self.counts is not None:
            assert self.counting is not None
            counts.write(self.counts, records, labels, self.counting, self.triage)
        if self.geojson is not None:
            geojson.write(self.geojson, records, labels, detector)
        if self.coco is not None:
            coco_results.write(self.coco, records, labels, detector)
