"""How many of each class per image, and for the whole survey: what an ecologist reports.

A CSV with one row per image, one column per class, a `total` column, and a last row
`TOTAL`. An unreadable image is not a zero count: its row is there with blank counts (so
no image goes missing from a survey), and the run's report names the error. Only
detections scoring at least their class's threshold count (the model's, chosen on
validation, unless `--count-threshold` sets one for all).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import write_atomically
from .records import Thresholds, class_names

TOTAL = "TOTAL"


def table(
    records: Sequence[dict[str, Any]], labels: list[str] | None, thresholds: Thresholds
) -> list[list[Any]]:
    """Header, one row per image (blank counts for an image that could not be read), then
    the survey's totals."""
    names = class_names(labels, records)
    rows: list[list[Any]] = [["image", *names, "total"]]
    totals = [0] * len(names)
    for record in records:
        if "error" in record:  # listed, so no image goes missing from the survey
            rows.append([record["image"], *[""] * len(names), ""])
            continue
        counts = [0] * len(names)
        for detection in record["detections"]:
            if detection["score"] >= thresholds.of(detection["class_id"]):
                counts[detection["class_id"]] += 1
        totals = [t + c for t, c in zip(totals, counts, strict=True)]
        rows.append([record["image"], *counts, sum(counts)])
    rows.append([TOTAL, *totals, sum(totals)])
    return rows


def write(path: Path, records: Sequence[dict[str, Any]], labels: list[str] | None,
          thresholds: Thresholds) -> None:
    text = io.StringIO(newline="")
    csv.writer(text).writerows(table(records, labels, thresholds))
    write_atomically(path, text.getvalue())
