"""How many of each class per image, and for the whole survey: what an ecologist reports.

A CSV with one row per image, one column per class, a `total` column, then the survey's
rows: `TOTAL` (detections counted), and where the model has a count calibration
`count_estimate`, `count_low` and `count_high` (its 95% interval) and `method` (how each
class was counted). An unreadable image is not a zero count: its row is there with blank
counts (so no image goes missing from a survey), and the run's report names the error. A
detection counts from its class's count threshold (calibrated on validation, independent of
what annotators are offered; `--count-threshold` sets one for all, uncalibrated).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import write_atomically
from .records import Counting, class_names

TOTAL = "TOTAL"
Z95 = 1.959964


def interval(mean: float, sd: float) -> tuple[float, float]:
    """The normal 95% interval of a count, never below 0."""
    return max(0.0, mean - Z95 * sd), mean + Z95 * sd


def table(
    records: Sequence[dict[str, Any]], labels: list[str] | None, counting: Counting,
    triage: float | None = None,
) -> list[list[Any]]:
    """Header, one row per image (blank counts for an image that could not be read), the
    survey's totals, then its estimates with their intervals where calibrated. With the
    model's triage threshold, a last column says which frames are likely empty."""
    names = class_names(labels, records)
    flag = [] if triage is None else ["likely_empty"]
    rows: list[list[Any]] = [["image", *names, "total", *flag]]
    totals = [0] * len(names)
    read = counted_all = 0  # counted_all: detections at the pooled threshold, every class
    for record in records:
        if "error" in record:  # listed, so no image goes missing from the survey
            rows.append([record["image"], *[""] * len(names), "", *[""] * len(flag)])
            continue
        read += 1
        counts = [0] * len(names)
        for detection in record["detections"]:
            if detection["score"] >= counting.of(detection["class_id"]):
                counts[detection["class_id"]] += 1
        totals = [t + c for t, c in zip(totals, counts, strict=True)]
        counted_all += sum(d["score"] >= counting.fallback for d in record["detections"])
        best = max((d["score"] for d in record["detections"]), default=0.0)
        empty = [] if triage is None else ["yes" if best < triage else "no"]
        rows.append([record["image"], *counts, sum(counts), *empty])
    rows.append([TOTAL, *totals, sum(totals)])
    rows += _estimates(totals, read, counting, counted_all)
    return [row + [""] * (len(rows[0]) - len(row)) for row in rows]


def survey_estimate(totals: Sequence[int], images: int, counting: Counting
                    ) -> tuple[list[tuple[float, float] | None], tuple[float, float] | None]:
    """Per class (estimate, sd) where calibrated, and the survey's: the calibrated classes'
    estimates summed, their errors taken as independent; None when no class is."""
    found = [counting.estimate(c, int(n), images) for c, n in enumerate(totals)]
    known = [f for f in found if f is not None]
    if not known:
        return found, None
    return found, (sum(m for m, _ in known), math.sqrt(sum(s * s for _, s in known)))


def _estimates(totals: list[int], images: int, counting: Counting, counted_all: int
               ) -> list[list[Any]]:
    """count_estimate / count_low / count_high / method rows (only `method` when no class is
    calibrated); the survey's total from the classes' estimates."""
    _, survey = survey_estimate(totals, images, counting)
    if survey is None:
        return [["method", *[counting.method(c) for c in range(len(totals))], ""]]
    found = [counting.bounds(c, int(n), images, counted_all) for c, n in enumerate(totals)]
    total = (survey[0], *interval(*survey))

    def row(name: str, at: int) -> list[Any]:
        cells = ["" if f is None else round(f[at], 1) for f in found]
        return [name, *cells, round(total[at], 1)]

    return [row("count_estimate", 0), row("count_low", 1), row("count_high", 2),
            ["method", *[counting.method(c) for c in range(len(totals))], ""]]


def write(path: Path, records: Sequence[dict[str, Any]], labels: list[str] | None,
          counting: Counting, triage: float | None = None) -> None:
    text = io.StringIO(newline="")
    csv.writer(text).writerows(table(records, labels, counting, triage))
    write_atomically(path, text.getvalue())
