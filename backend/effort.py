"""Annotator effort: what a person must do to turn the pre-labels into the right boxes.

A pre-label is worth offering only if keeping it beats drawing: a box the annotator must
delete costs about what a missing one costs to draw. So for a model and a score threshold t
on labelled images, per class:

- kept: offered boxes (score >= t) that match a ground-truth box of their class at
  IoU >= 0.5, greedily by score, each ground-truth box matched once (COCO's matching);
- deleted: the other offered boxes;
- drawn: ground-truth boxes no offered box matched;
- corrections = delete_cost * deleted + draw_cost * drawn, and
  effort_ratio = corrections / ground-truth boxes: 1.0 is as costly as drawing everything
  from scratch, 0 is nothing to do.

Unlike AP, this counts the boxes annotators actually see, at the threshold they see them
at, and it is what a weak model's pre-labels cost: 90 actions per image where drawing costs
10 (measured on the demo before thresholds were chosen). `choose_thresholds` picks, per
class, the threshold with the fewest corrections (ties: the higher one); a class with fewer
than `min_boxes` ground-truth boxes takes the threshold chosen on all classes pooled; a
class whose best is still no cheaper than drawing is not offered at all (NOT_OFFERED).

A threshold fitted on a small val split flatters itself: on the demo, birds chosen at 0.82
on a dozen val birds were offered 21 times on the next images and kept 4 times. So a
threshold is only eligible when the boxes it offers are worth keeping with confidence: an
offered box pays off when it is kept more often than delete_cost / (delete_cost +
draw_cost) (0.5 at 1:1), and the one-sided `confidence` (0.9) lower bound of the offered
boxes' precision (Wilson's) must clear that. With little evidence a class is not offered.

Greedy matching by score makes every threshold's matching the prefix of one matching over
all boxes, so one pass gives the whole curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

NOT_OFFERED = 1.01  # a threshold no score reaches: the class is not pre-labelled
PLOT_THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)


@dataclass(frozen=True)
class EffortSettings:
    iou: float = 0.5
    delete_cost: float = 1.0
    draw_cost: float = 1.0
    min_boxes: int = 10  # fewer ground-truth boxes of a class: the pooled threshold
    confidence: float = 0.9  # that the offered boxes are kept often enough to pay

    @property
    def break_even(self) -> float:
        """The precision from which offering boxes saves corrections."""
        return self.delete_cost / (self.delete_cost + self.draw_cost)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> EffortSettings:
        return cls(**{k: type(getattr(cls, k))(v) for k, v in params.items()
                      if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Scored:
    """Every detection of a run over labelled images, matched once, and the ground truth:
    detections by (image, class, score, matched); ground-truth boxes by (image, class)."""

    image: np.ndarray
    cls: np.ndarray
    score: np.ndarray
    matched: np.ndarray
    truth_image: np.ndarray
    truth_cls: np.ndarray
    images: int
    names: tuple[str, ...]

    def subset(self, cls: int | None) -> tuple[np.ndarray, np.ndarray, int]:
        """Scores (descending), matched flags and ground-truth count of one class (all
        classes pooled for None)."""
        pick = slice(None) if cls is None else self.cls == cls
        truth = len(self.truth_cls) if cls is None else int((self.truth_cls == cls).sum())
        order = np.argsort(-self.score[pick], kind="stable")
        return self.score[pick][order], self.matched[pick][order], truth


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of (N, 4) and (M, 4) corner boxes."""
    wh = np.clip(np.minimum(a[:, None, 2:], b[None, :, 2:])
                 - np.maximum(a[:, None, :2], b[None, :, :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match(boxes: np.ndarray, scores: np.ndarray, truth: np.ndarray, iou: float) -> np.ndarray:
    """Which detections (of one image and class) keep a ground-truth box: by descending
    score, each takes the best-overlapping unmatched one at IoU >= `iou`."""
    matched = np.zeros(len(boxes), bool)
    if not len(boxes) or not len(truth):
        return matched
    overlaps = _iou(boxes, truth)
    free = np.ones(len(truth), bool)
    for i in np.argsort(-scores, kind="stable"):
        candidates = np.where(free, overlaps[i], -1.0)
        j = int(candidates.argmax())
        if candidates[j] >= iou:
            matched[i], free[j] = True, False
    return matched


def _corners(bbox: Sequence[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def score_coco(coco: dict[str, Any], records: list[dict[str, Any]],
               settings: EffortSettings = EffortSettings()) -> Scored:
    """`records` (COCO results: image_id, category_id, bbox, score) against `coco`'s
    annotations."""
    categories = [c["id"] for c in coco["categories"]]
    index = {cat: i for i, cat in enumerate(categories)}
    images = {im["id"]: i for i, im in enumerate(coco["images"])}
    truth: dict[tuple[int, int], list[list[float]]] = {}
    for a in coco["annotations"]:
        truth.setdefault((images[a["image_id"]], index[a["category_id"]]), []).append(
            _corners(a["bbox"]))
    found: dict[tuple[int, int], list[tuple[list[float], float]]] = {}
    for r in records:
        found.setdefault((images[r["image_id"]], index[r["category_id"]]), []).append(
            (_corners(r["bbox"]), float(r["score"])))
    rows: list[tuple[int, int, float, bool]] = []
    for key, dets in found.items():
        boxes = np.array([d[0] for d in dets], float).reshape(-1, 4)
        scores = np.array([d[1] for d in dets], float)
        gt = np.array(truth.get(key, []), float).reshape(-1, 4)
        rows += [(*key, s, m) for s, m in zip(scores, match(boxes, scores, gt, settings.iou),
                                              strict=True)]
    keys = [k for k, boxes in truth.items() for _ in boxes]
    return Scored(
        image=np.array([r[0] for r in rows], int), cls=np.array([r[1] for r in rows], int),
        score=np.array([r[2] for r in rows], float), matched=np.array([r[3] for r in rows], bool),
        truth_image=np.array([k[0] for k in keys], int),
        truth_cls=np.array([k[1] for k in keys], int),
        images=len(coco["images"]),
        names=tuple(c["name"] for c in coco["categories"]),
    )


def _offered_kept(scores: np.ndarray, matched: np.ndarray, thresholds: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Boxes offered and kept at each threshold, from descending scores and their matches."""
    offered = np.searchsorted(-scores, -thresholds, side="right")  # scores >= t
    return offered, np.concatenate([[0], np.cumsum(matched)])[offered]


def _cost(offered: Any, kept: Any, truth: int, settings: EffortSettings) -> Any:
    """Corrections: the offered boxes not kept deleted, the truth not kept drawn."""
    return settings.delete_cost * (offered - kept) + settings.draw_cost * (truth - kept)


def precision_lower_bound(kept: np.ndarray, offered: np.ndarray, confidence: float
                          ) -> np.ndarray:
    """Wilson's one-sided lower bound of kept / offered (0 where nothing is offered)."""
    z = float(NormalDist().inv_cdf(confidence))
    n = np.maximum(offered, 1).astype(float)
    p = kept / n
    centre = p + z * z / (2 * n)
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return np.where(offered > 0, (centre - spread) / (1 + z * z / n), 0.0)


def best_threshold(scores: np.ndarray, matched: np.ndarray, truth: int,
                   settings: EffortSettings) -> tuple[float, float]:
    """(threshold, effort ratio) with the fewest corrections among the thresholds whose
    offered boxes pay off with confidence, the higher threshold on a tie; NOT_OFFERED when
    nothing offered beats drawing from scratch."""
    candidates = np.concatenate([[NOT_OFFERED], np.unique(scores)[::-1]])
    offered, kept = _offered_kept(scores, matched, candidates)
    cost = _cost(offered, kept, truth, settings)
    eligible = precision_lower_bound(kept, offered, settings.confidence) > settings.break_even
    eligible[0] = True  # not offering is always possible
    cost = np.where(eligible, cost, np.inf)
    best = int(np.argmin(cost))  # the first minimum: candidates run from high to low
    ratio = float(cost[best]) / max(truth, 1)
    if best == 0 or ratio >= 1.0:
        return NOT_OFFERED, float(cost[0]) / max(truth, 1)
    return float(candidates[best]), ratio


def choose_thresholds(scored: Scored, settings: EffortSettings = EffortSettings()
                      ) -> dict[str, Any]:
    """Per-class thresholds (class name -> threshold) and the pooled one, as model.json
    stores them."""
    pooled, _ = best_threshold(*scored.subset(None), settings)
    per_class = {}
    for c, name in enumerate(scored.names):
        scores, matched, truth = scored.subset(c)
        per_class[name] = (pooled if truth < settings.min_boxes
                           else best_threshold(scores, matched, truth, settings)[0])
    return {"per_class": per_class, "pooled": pooled,
            "iou": settings.iou, "delete_cost": settings.delete_cost,
            "draw_cost": settings.draw_cost, "min_boxes": settings.min_boxes,
            "confidence": settings.confidence}


def report(scored: Scored, per_class: dict[str, float],
           settings: EffortSettings = EffortSettings()) -> dict[str, Any]:
    """What annotators and surveys get at these thresholds: per class and overall kept,
    deleted, drawn, corrections (per image), effort ratio, precision, recall, and counts
    (predicted vs true totals, relative error, mean absolute count error per image)."""
    classes, totals = {}, np.zeros(3, int)
    for c, name in enumerate(scored.names):
        scores, matched, truth = scored.subset(c)
        t = per_class.get(name, NOT_OFFERED)
        offered = int((scores >= t).sum())
        kept = int(matched[scores >= t].sum())
        row = _figures(offered, kept, truth, scored.images, settings)
        row.update(threshold=t, **_counts(scored, c, t))
        classes[name] = row
        totals += (offered, kept, truth)
    offered, kept, truth = (int(v) for v in totals)
    return {"overall": _figures(offered, kept, truth, scored.images, settings),
            "per_class": classes, "images": scored.images}


def _figures(offered: int, kept: int, truth: int, images: int,
             settings: EffortSettings) -> dict[str, Any]:
    deleted, drawn = offered - kept, truth - kept
    corrections = _cost(offered, kept, truth, settings)
    return {
        "offered": offered, "kept": kept, "deleted": deleted, "drawn": drawn,
        "ground_truth": truth, "corrections": round(float(corrections), 3),
        "corrections_per_image": round(float(corrections) / max(images, 1), 3),
        "effort_ratio": round(float(corrections) / max(truth, 1), 4),
        "precision": round(kept / offered, 4) if offered else None,
        "recall": round(kept / truth, 4) if truth else None,
    }


def _counts(scored: Scored, cls: int, threshold: float) -> dict[str, Any]:
    """A survey's count of the class: boxes offered vs ground truth, in total and per image."""
    offered = np.bincount(scored.image[(scored.cls == cls) & (scored.score >= threshold)],
                          minlength=scored.images)
    true = np.bincount(scored.truth_image[scored.truth_cls == cls], minlength=scored.images)
    total_true = int(true.sum())
    return {
        "count_predicted": int(offered.sum()), "count_true": total_true,
        "count_relative_error": (round((int(offered.sum()) - total_true) / total_true, 4)
                                 if total_true else None),
        "count_mae_per_image": round(float(np.abs(offered - true).mean()), 4)
        if scored.images else 0.0,
    }


def curve(scored: Scored, settings: EffortSettings = EffortSettings()) -> list[dict[str, Any]]:
    """Effort ratio against the threshold, per class (for `dvc plots`)."""
    points = []
    for c, name in enumerate(scored.names):
        scores, matched, truth = scored.subset(c)
        cost = _cost(*_offered_kept(scores, matched, PLOT_THRESHOLDS), truth, settings)
        points += [{"class": name, "threshold": float(t),
                    "effort_ratio": round(float(v) / max(truth, 1), 4)}
                   for t, v in zip(PLOT_THRESHOLDS, cost, strict=True)]
    return points
