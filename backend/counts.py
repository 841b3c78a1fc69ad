"""What a survey publishes: how many animals of each class, with a 95% interval, and which
images nobody needs to open. Both are calibrated on labelled val images, separately from
the thresholds annotators are offered boxes at (those minimise corrections, and a class not
offered would count 0).

Counts: a ratio estimator, as survey sampling uses one (Cochran, *Sampling Techniques*,
ch. 6). Per class, the score threshold at which the val images hold as many detections as
true animals (false positives balancing misses), then the ratio R = true / counted there.
A survey with X detections at that threshold over n images is estimated at R * X, with
variance n * s^2 + X^2 * var(R): s^2 the per-image variance of (true - R * counted) on val
(what the new images add) and var(R) its delta-method variance (what the val sample leaves
unknown). A class with fewer than `min_boxes` val animals, or in fewer than MIN_IMAGES (3)
val images, takes the classes' pooled calibration for its estimate, but its interval runs
from 0 to the upper bound of the survey's total: with no evidence of its own, the model may
call its animals another class (the pooled ratio cannot see that: generated savanna surveys
counted zebras as elephants), so only the total bounds it. With less evidence than that,
nothing is calibrated and counts say "uncalibrated". The interval assumes the survey's
images are like val's; `metrics.json` reports how often it covered the truth on val folds
it was not fitted on.

Triage: an image's "animals present" score is its best detection's score; the threshold
keeps `recall` (0.95) of the val images that hold animals, with 90% confidence (so a val
split with few images of animals triages nothing), and every image below it is "likely
empty".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .effort import Scored, cross_folds, precision_lower_bound
from .imagery.counts import interval

COUNTS_KEY = "count_calibration"
MIN_IMAGES = 3  # val images holding the animals a calibration is fitted to, at least
TRIAGE_KEY = "triage"
DEFAULT_COUNT_THRESHOLD = 0.5


def balanced_threshold(scores: np.ndarray, truth: int) -> float | None:
    """The score from which as many detections as true animals are counted (the higher one
    on a tie); None without detections or animals."""
    ordered = np.sort(scores)[::-1]
    if not len(ordered) or truth == 0:
        return None
    return float(ordered[min(truth, len(ordered)) - 1])


def _calibration(scored: Scored, cls: int | None, threshold: float) -> dict[str, Any] | None:
    pick = np.ones(len(scored.cls), bool) if cls is None else scored.cls == cls
    truth_pick = np.ones(len(scored.truth_cls), bool) if cls is None else scored.truth_cls == cls
    counted = np.bincount(scored.image[pick & (scored.score >= threshold)],
                          minlength=scored.images).astype(float)
    true = np.bincount(scored.truth_image[truth_pick], minlength=scored.images).astype(float)
    if counted.sum() == 0 or (true > 0).sum() < MIN_IMAGES:
        return None  # a ratio fitted to one or two images has no variance to show
    ratio = true.sum() / counted.sum()
    residual = true - ratio * counted
    variance = float((residual ** 2).sum() / max(scored.images - 1, 1))
    return {"threshold": round(threshold, 4), "ratio": round(float(ratio), 6),
            "image_variance": round(variance, 6),
            "ratio_variance": round(scored.images * variance / counted.sum() ** 2, 8),
            "val_images": scored.images, "val_counted": int(counted.sum()),
            "val_true": int(true.sum())}


def calibrate_counts(scored: Scored, min_boxes: int = 10) -> dict[str, Any]:
    """Per-class count calibrations (as model.json stores them): each class with at least
    `min_boxes` val animals its own, the others the pooled one."""
    pooled_threshold = balanced_threshold(scored.score, len(scored.truth_cls))
    pooled = (None if pooled_threshold is None
              else _calibration(scored, None, pooled_threshold))
    per_class: dict[str, Any] = {}
    for c, name in enumerate(scored.names):
        truth = int((scored.truth_cls == c).sum())
        own = balanced_threshold(scored.score[scored.cls == c], truth)
        cal = None if truth < min_boxes or own is None else _calibration(scored, c, own)
        per_class[name] = ({**cal, "source": "own"} if cal is not None else
                           None if pooled is None else {**pooled, "source": "pooled"})
    return {"method": "ratio", "per_class": per_class, "pooled": pooled,
            "min_boxes": min_boxes}


def estimate(calibration: dict[str, Any], counted: int, images: int
             ) -> tuple[float, float]:
    """(estimated animals, standard deviation) of a survey with `counted` detections at the
    calibration's threshold over `images` images."""
    mean = calibration["ratio"] * counted
    variance = (images * calibration["image_variance"]
                + counted ** 2 * calibration["ratio_variance"])
    return mean, math.sqrt(max(variance, 0.0))


def class_interval(calibration: dict[str, Any], counted: int, images: int,
                   pooled: dict[str, Any] | None, counted_all: int
                   ) -> tuple[float, float, float]:
    """(estimate, low, high) of one class on a survey: its calibration's 95% interval, or for
    a class counted by the pooled calibration, 0 to the survey total's upper bound
    (`counted_all`: detections of every class at the pooled threshold)."""
    mean, sd = estimate(calibration, counted, images)
    low, high = interval(mean, sd)
    if calibration.get("source") == "pooled" and pooled is not None:
        low, high = 0.0, max(high, interval(*estimate(pooled, counted_all, images))[1])
    return mean, low, high


@dataclass(frozen=True)
class Counting:
    """How a model's detections become counts: per class the threshold a detection needs to
    count and, when calibrated, the estimate with its interval."""

    by_class: tuple[dict[str, Any] | None, ...]  # a calibration per class id, or None
    fallback: float  # the threshold of classes without one: the pooled calibration's
    source: str
    pooled: dict[str, Any] | None = None  # the pooled calibration

    @classmethod
    def uniform(cls, threshold: float, source: str) -> Counting:
        return cls((), float(threshold), source)

    @classmethod
    def of_model(cls, metadata: dict[str, Any], labels: Sequence[str] | None) -> Counting:
        stored = metadata.get(COUNTS_KEY)
        if not stored:
            return cls.uniform(DEFAULT_COUNT_THRESHOLD, (
                f"the default {DEFAULT_COUNT_THRESHOLD}, uncalibrated (the model has no count "
                "calibration; the loop's evaluate or `tridentloop calibrate` makes one)"))
        per_class = stored.get("per_class", {})
        pooled = stored.get("pooled")
        fallback = DEFAULT_COUNT_THRESHOLD if pooled is None else float(pooled["threshold"])
        return cls(tuple(per_class.get(name) for name in labels or ()), fallback,
                   "the model's count calibration (ratio estimator, chosen on validation)",
                   pooled)

    def resolve(self, override: float | None, source: str) -> Counting:
        return self if override is None else Counting.uniform(override, source)

    def calibration(self, class_id: int) -> dict[str, Any] | None:
        return self.by_class[class_id] if 0 <= class_id < len(self.by_class) else None

    def of(self, class_id: int) -> float:
        cal = self.calibration(class_id)
        return self.fallback if cal is None else float(cal["threshold"])

    def method(self, class_id: int) -> str:
        cal = self.calibration(class_id)
        if cal is None:
            return f"detections >= {self.of(class_id):g}, uncalibrated"
        bound = ("; interval 0 to the survey total's upper bound (no evidence of its own)"
                 if cal["source"] == "pooled" else "")
        return (f"ratio {cal['ratio']:.3f} at {cal['threshold']:g} "
                f"({cal['source']}, {cal['val_true']} val animals){bound}")

    def estimate(self, class_id: int, counted: int, images: int
                 ) -> tuple[float, float] | None:
        cal = self.calibration(class_id)
        return None if cal is None else estimate(cal, counted, images)

    def bounds(self, class_id: int, counted: int, images: int, counted_all: int
               ) -> tuple[float, float, float] | None:
        """`class_interval` by this class's calibration; None when uncalibrated."""
        cal = self.calibration(class_id)
        return (None if cal is None
                else class_interval(cal, counted, images, self.pooled, counted_all))

    def describe(self, labels: Sequence[str] | None = None) -> str:
        if not self.by_class:
            return f"detections >= {self.fallback:g} ({self.source})"
        names = list(labels or [f"class{i}" for i in range(len(self.by_class))])
        return "; ".join(f"{n}: {self.method(i)}" for i, n in enumerate(names)) + (
            f" ({self.source})")


def image_scores(scored: Scored) -> np.ndarray:
    """Each image's best detection score (0 without any)."""
    best = np.zeros(scored.images)
    np.maximum.at(best, scored.image, scored.score)
    return best


def triage_threshold(scored: Scored, recall: float, confidence: float = 0.9
                     ) -> float | None:
    """The highest image score that keeps `recall` of the val images with animals with
    `confidence` (Wilson's lower bound of the share kept, as effort bounds precision); None
    without that evidence: two or three val herds cannot show that skipping frames misses
    no more than 1 - recall of them (at 0.95 and 0.9 it takes 32 images with animals)."""
    animals = np.bincount(scored.truth_image, minlength=scored.images) > 0
    positive = np.sort(image_scores(scored)[animals])[::-1]
    kept = np.arange(1, len(positive) + 1)
    bound = precision_lower_bound(kept, np.full(len(kept), len(positive)), confidence)
    enough = np.flatnonzero(bound >= recall)
    return float(positive[enough[0]]) if len(enough) else None


def triage_figures(scored: Scored, threshold: float | None) -> dict[str, Any]:
    """What skipping the images below `threshold` saves and loses."""
    animals = np.bincount(scored.truth_image, minlength=scored.images)
    skipped = (image_scores(scored) < threshold) if threshold is not None else np.zeros(
        scored.images, bool)
    positives, found = int((animals > 0).sum()), int(((animals > 0) & ~skipped).sum())
    return {"threshold": threshold, "images": scored.images,
            "skipped_images": int(skipped.sum()),
            "skipped_share": round(float(skipped.mean()), 4) if scored.images else 0.0,
            "animals_in_skipped": int(animals[skipped].sum()),
            "images_with_animals": positives, "kept_with_animals": found,
            "image_recall": round(found / positives, 4) if positives else None}


def choose_triage(scored: Scored, recall: float = 0.95, folds: int = 5) -> dict[str, Any]:
    """The triage threshold (for model.json) with its figures on val, in sample and with the
    threshold chosen on the other folds (what a new survey can expect)."""
    threshold = triage_threshold(scored, recall)
    held_out = np.zeros(4, int)  # skipped, animals in skipped, positives kept, positives
    for _, fit, held in cross_folds(scored, folds):
        fig = triage_figures(held, triage_threshold(fit, recall))
        held_out += [fig[k] for k in ("skipped_images", "animals_in_skipped",
                                      "kept_with_animals", "images_with_animals")]
    return {"recall_target": recall, **triage_figures(scored, threshold), "out_of_sample": {
        "skipped_share": round(held_out[0] / max(scored.images, 1), 4),
        "animals_in_skipped": int(held_out[1]),
        "image_recall": round(held_out[2] / held_out[3], 4) if held_out[3] else None}}


def class_count(scored: Scored, cls: int, calibrations: dict[str, Any]) -> dict[str, Any]:
    """One class's count on these images by `calibrations` (as `calibrate_counts` makes
    them): the true count, and (when calibrated) the detections counted, the estimate and
    its 95% interval, unrounded."""
    true = int((scored.truth_cls == cls).sum())
    calibration = calibrations["per_class"].get(scored.names[cls])
    if calibration is None:
        return {"count_true": true, "estimate": None}
    counted = int(((scored.cls == cls) & (scored.score >= calibration["threshold"])).sum())
    pooled = calibrations["pooled"]
    counted_all = 0 if pooled is None else int((scored.score >= pooled["threshold"]).sum())
    mean, low, high = class_interval(calibration, counted, scored.images, pooled, counted_all)
    return {"count_true": true, "counted": counted, "estimate": mean, "low": low,
            "high": high, "covered": low <= true <= high}


def describe_count(row: dict[str, Any]) -> str:
    """`72 [23, 121]` (estimate and 95% interval), or `-` when uncalibrated."""
    if row.get("estimate") is None:
        return "-"
    return f"{row['estimate']:.0f} [{row['low']:.0f}, {row['high']:.0f}]"


def count_figures(scored: Scored, calibration: dict[str, Any]) -> dict[str, Any]:
    """Per class on val: the raw count at the threshold, the estimate, its interval and the
    truth; and how often the interval covered the truth on folds it was not fitted on."""
    rows = {}
    for c, name in enumerate(scored.names):
        cal = calibration["per_class"].get(name)
        row = class_count(scored, c, calibration)
        rows[name] = row if cal is None else {
            "count_true": row["count_true"], "counted": row["counted"],
            **{k: round(row[k], 2) for k in ("estimate", "low", "high")},
            "source": cal["source"]}
    return {"method": calibration["method"], "per_class": rows,
            "coverage_out_of_sample": _coverage(scored, calibration["min_boxes"])}


def _coverage(scored: Scored, min_boxes: int, folds: int = 5) -> dict[str, Any]:
    """Share of (fold, class) pairs whose 95% interval, calibrated on the other folds,
    covered the fold's true count."""
    covered = trials = 0
    for _, fit, held in cross_folds(scored, folds):
        calibration = calibrate_counts(fit, min_boxes)
        for c, name in enumerate(scored.names):
            if calibration["per_class"].get(name) is not None:
                trials += 1
                covered += class_count(held, c, calibration)["covered"]
    return {"covered": covered, "trials": trials,
            "share": round(covered / trials, 4) if trials else None}
