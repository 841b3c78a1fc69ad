"""Annotator effort: what a person must do to turn the pre-labels into the right boxes.

A pre-label is worth offering only if keeping it beats drawing: a box the annotator must
delete costs about what a missing one costs to draw. So for a model and a score threshold t
on labelled images, per class:

- matched: offered boxes (score >= t) that match a ground-truth box of their class at
  IoU >= `iou` (0.5), greedily by score, each ground-truth box matched once (COCO's
  matching); of those, *kept* as they are from IoU `keep_iou` (0.8) on, *adjusted* below it
  (a loose box's edges moved: work, and a loose box left alone would become a loose label);
- deleted: the other offered boxes;
- drawn: ground-truth boxes no offered box matched;
- corrections = delete_cost * deleted + adjust_cost * adjusted + draw_cost * drawn, and
  effort_ratio = corrections / (draw_cost * ground-truth boxes): 1.0 is as costly as drawing
  everything from scratch, 0 is nothing to do, whatever unit the costs are given in.

The default costs follow the timing literature: drawing a box takes 7 s by extreme clicking
(Papadopoulos et al., ICCV 2017) and 25-35 s by the ILSVRC protocol (Su et al., 2012), while
verifying one takes under 2 s (Papadopoulos et al., CVPR 2016); deleting is a click and a key
but, as a wrong box must first be looked at and judged, we price it as a draw (1:1), and
moving a loose box's edges at half a draw.

Unlike AP, this counts the boxes annotators actually see, at the threshold they see them
at. `choose_thresholds` picks, per class, the threshold with the fewest corrections (ties:
the higher one); a class whose best is still no cheaper than drawing is not offered (None:
no number stands for "not offered"). A class with fewer than `min_boxes` ground-truth boxes
on val has no evidence and is withheld, unless `offer_rare: pooled` gives it the threshold
chosen on all classes pooled; `withheld` says which and why.

A threshold fitted on a small val split flatters itself: on the demo, birds chosen at 0.82
on a dozen val birds were offered 21 times on the next images and kept 4 times. So a
threshold is only eligible when the boxes it offers are worth keeping with confidence: an
offered box pays off when it is matched more often than delete_cost / (delete_cost +
draw_cost) (0.5 at 1:1), and the one-sided `confidence` (0.9) lower bound of the offered
boxes' precision (Wilson's) must clear that. And the figure a gate decides on is measured
out of sample (`cross_fitted`): thresholds chosen on k-1 folds of the val images, scored on
the fold left out, with an interval from resampling the images.

Greedy matching by score makes every threshold's matching the prefix of one matching over
all boxes, so one pass gives the whole curve.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from .detection.boxes import pairwise_iou
from .settings import from_section

PLOT_THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)
RARE_CHOICES = ("withhold", "pooled")


@dataclass(frozen=True)
class EffortSettings:
    iou: float = 0.5  # a pre-label matches a true box this well: kept or adjusted
    keep_iou: float = 0.8  # and from this well on it is kept as it is
    delete_cost: float = 1.0
    adjust_cost: float = 0.5
    draw_cost: float = 1.0
    min_boxes: int = 10  # fewer ground-truth boxes of a class on val: no evidence
    confidence: float = 0.9  # that the offered boxes are matched often enough to pay
    offer_rare: str = "withhold"  # or "pooled": classes without evidence take the pooled one
    folds: int = 5  # cross-fitting the effort figure over the val images

    def __post_init__(self) -> None:
        if self.offer_rare not in RARE_CHOICES:
            raise ValueError(f"effort.offer_rare is {self.offer_rare!r}; choose one of "
                             f"{', '.join(RARE_CHOICES)}")
        if not 0 < self.iou <= self.keep_iou <= 1:
            raise ValueError(f"effort.iou {self.iou} and effort.keep_iou {self.keep_iou} must "
                             "satisfy 0 < iou <= keep_iou <= 1")
        if min(self.delete_cost, self.adjust_cost) < 0 or self.draw_cost <= 0:
            raise ValueError("effort costs must be >= 0, and effort.draw_cost > 0")

    @property
    def break_even(self) -> float:
        """The precision from which offering boxes saves corrections."""
        return self.delete_cost / (self.delete_cost + self.draw_cost)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> EffortSettings:
        return from_section(cls, params)


@dataclass(frozen=True)
class Scored:
    """Every detection of a run over labelled images, matched once, and the ground truth:
    detections by (image, class, score, IoU with the true box they matched, 0 if none);
    ground-truth boxes by (image, class)."""

    image: np.ndarray
    cls: np.ndarray
    score: np.ndarray
    overlap: np.ndarray
    truth_image: np.ndarray
    truth_cls: np.ndarray
    images: int
    names: tuple[str, ...]

    def subset(self, cls: int | None) -> tuple[np.ndarray, np.ndarray, int]:
        """Scores (descending), match IoUs and ground-truth count of one class (all classes
        pooled for None)."""
        pick = slice(None) if cls is None else self.cls == cls
        truth = len(self.truth_cls) if cls is None else int((self.truth_cls == cls).sum())
        order = np.argsort(-self.score[pick], kind="stable")
        return self.score[pick][order], self.overlap[pick][order], truth

    def of_images(self, chosen: np.ndarray) -> Scored:
        """The same run restricted to some images (a boolean mask over them), renumbered."""
        number = np.cumsum(chosen) - 1
        rows, truth = chosen[self.image], chosen[self.truth_image]
        return replace(self, image=number[self.image[rows]], cls=self.cls[rows],
                       score=self.score[rows], overlap=self.overlap[rows],
                       truth_image=number[self.truth_image[truth]],
                       truth_cls=self.truth_cls[truth], images=int(chosen.sum()))


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of (N, 4) and (M, 4) corner boxes: the engine's pairwise IoU, on arrays."""
    return pairwise_iou(torch.from_numpy(np.asarray(a, np.float64)),
                        torch.from_numpy(np.asarray(b, np.float64))).numpy()


def match(boxes: np.ndarray, scores: np.ndarray, truth: np.ndarray, iou: float
          ) -> tuple[np.ndarray, np.ndarray]:
    """Which true box each detection (of one image and class) matches, by descending score,
    each taking the best-overlapping unmatched one at IoU >= `iou`: (index into `truth` or
    -1, the IoU of the pair or 0)."""
    which = np.full(len(boxes), -1)
    overlap = np.zeros(len(boxes))
    if not len(boxes) or not len(truth):
        return which, overlap
    overlaps = iou_matrix(boxes, truth)
    free = np.ones(len(truth), bool)
    for i in np.argsort(-scores, kind="stable"):
        candidates = np.where(free, overlaps[i], -1.0)
        j = int(candidates.argmax())
        if candidates[j] >= iou:
            which[i], overlap[i], free[j] = j, candidates[j], False
    return which, overlap


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
    rows: list[tuple[int, int, float, float]] = []
    for key, dets in found.items():
        boxes = np.array([d[0] for d in dets], float).reshape(-1, 4)
        scores = np.array([d[1] for d in dets], float)
        gt = np.array(truth.get(key, []), float).reshape(-1, 4)
        overlap = match(boxes, scores, gt, settings.iou)[1]
        rows += [(*key, s, o) for s, o in zip(scores, overlap, strict=True)]
    keys = [k for k, boxes in truth.items() for _ in boxes]
    return Scored(
        image=np.array([r[0] for r in rows], int), cls=np.array([r[1] for r in rows], int),
        score=np.array([r[2] for r in rows], float),
        overlap=np.array([r[3] for r in rows], float),
        truth_image=np.array([k[0] for k in keys], int),
        truth_cls=np.array([k[1] for k in keys], int),
        images=len(coco["images"]),
        names=tuple(c["name"] for c in coco["categories"]),
    )


@dataclass(frozen=True)
class Tally:
    """What an annotator does with the offered boxes of one class (or of several)."""

    offered: Any
    matched: Any
    adjusted: Any
    truth: Any

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.offered + other.offered, self.matched + other.matched,
                     self.adjusted + other.adjusted, self.truth + other.truth)

    def cost(self, settings: EffortSettings) -> Any:
        """Corrections: the unmatched offered boxes deleted, the loose ones adjusted, the
        truth not matched drawn."""
        return (settings.delete_cost * (self.offered - self.matched)
                + settings.adjust_cost * self.adjusted
                + settings.draw_cost * (self.truth - self.matched))

    def ratio(self, settings: EffortSettings) -> Any:
        """Corrections over drawing every true box from scratch."""
        return self.cost(settings) / (settings.draw_cost * np.maximum(self.truth, 1))


def _tally(scores: np.ndarray, overlap: np.ndarray, truth: int, thresholds: np.ndarray,
           settings: EffortSettings) -> Tally:
    """The tally at each threshold, from descending scores and their match IoUs."""
    offered = np.searchsorted(-scores, -thresholds, side="right")  # scores >= t
    matched = np.concatenate([[0], np.cumsum(overlap > 0)])[offered]
    adjusted = np.concatenate([[0], np.cumsum((overlap > 0) & (overlap < settings.keep_iou))])
    return Tally(offered, matched, adjusted[offered], truth)


def precision_lower_bound(kept: np.ndarray, offered: np.ndarray, confidence: float
                          ) -> np.ndarray:
    """Wilson's one-sided lower bound of kept / offered (0 where nothing is offered)."""
    z = float(NormalDist().inv_cdf(confidence))
    n = np.maximum(offered, 1).astype(float)
    p = kept / n
    centre = p + z * z / (2 * n)
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return np.where(offered > 0, (centre - spread) / (1 + z * z / n), 0.0)


def best_threshold(scores: np.ndarray, overlap: np.ndarray, truth: int,
                   settings: EffortSettings) -> tuple[float | None, float]:
    """(threshold, effort ratio) with the fewest corrections among the thresholds whose
    offered boxes pay off with confidence, the higher threshold on a tie; None (not
    offered) when nothing offered beats drawing from scratch."""
    candidates = np.concatenate([[np.inf], np.unique(scores)[::-1]])  # inf: offer nothing
    tally = _tally(scores, overlap, truth, candidates, settings)
    eligible = precision_lower_bound(tally.matched, tally.offered,
                                     settings.confidence) > settings.break_even
    eligible[0] = True  # not offering is always possible
    ratios = np.where(eligible, tally.ratio(settings), np.inf)
    best = int(np.argmin(ratios))  # the first minimum: candidates run from high to low
    if best == 0 or ratios[best] >= 1.0:
        return None, float(ratios[0])
    return float(candidates[best]), float(ratios[best])


def choose_thresholds(scored: Scored, settings: EffortSettings = EffortSettings()
                      ) -> dict[str, Any]:
    """Per-class thresholds (class name -> threshold, None: not offered), the pooled one,
    which classes are withheld and why, as model.json stores them."""
    pooled, _ = best_threshold(*scored.subset(None), settings)
    per_class: dict[str, float | None] = {}
    withheld: dict[str, str] = {}
    for c, name in enumerate(scored.names):
        scores, overlap, truth = scored.subset(c)
        if truth < settings.min_boxes and settings.offer_rare == "pooled":
            per_class[name] = pooled
        elif truth < settings.min_boxes:
            per_class[name] = None
            withheld[name] = (f"{truth} val box(es), fewer than effort.min_boxes "
                              f"{settings.min_boxes}: no evidence (effort.offer_rare: pooled "
                              "offers it at the pooled threshold)")
        else:
            per_class[name] = best_threshold(scores, overlap, truth, settings)[0]
            if per_class[name] is None:
                withheld[name] = ("no threshold makes its boxes cheaper than drawing with "
                                  f"confidence {settings.confidence} (the bar: "
                                  "effort.confidence and effort.delete_cost, calibrate's "
                                  "--confidence and --delete-cost; more val labels)")
    return {"per_class": per_class, "pooled": pooled, "withheld": withheld,
            "iou": settings.iou, "keep_iou": settings.keep_iou,
            "delete_cost": settings.delete_cost, "adjust_cost": settings.adjust_cost,
            "draw_cost": settings.draw_cost, "min_boxes": settings.min_boxes,
            "confidence": settings.confidence, "offer_rare": settings.offer_rare}


def _class_tally(scored: Scored, cls: int, threshold: float | None,
                 settings: EffortSettings) -> Tally:
    scores, overlap, truth = scored.subset(cls)
    t = np.inf if threshold is None else threshold
    tally = _tally(scores, overlap, truth, np.array([t]), settings)
    return Tally(*(int(np.asarray(v).reshape(-1)[0]) for v in
                   (tally.offered, tally.matched, tally.adjusted, tally.truth)))


def report(scored: Scored, per_class: dict[str, float | None],
           settings: EffortSettings = EffortSettings()) -> dict[str, Any]:
    """What annotators get at these thresholds: per class and overall kept, adjusted,
    deleted, drawn, corrections (per image), effort ratio, precision and recall."""
    classes, totals = {}, Tally(0, 0, 0, 0)
    for c, name in enumerate(scored.names):
        tally = _class_tally(scored, c, per_class.get(name), settings)
        classes[name] = {**_figures(tally, scored.images, settings),
                         "threshold": per_class.get(name)}
        totals = totals + tally
    return {"overall": _figures(totals, scored.images, settings),
            "per_class": classes, "images": scored.images}


def _figures(tally: Tally, images: int, settings: EffortSettings) -> dict[str, Any]:
    corrections = float(tally.cost(settings))
    return {
        "offered": tally.offered, "kept": tally.matched - tally.adjusted,
        "adjusted": tally.adjusted, "deleted": tally.offered - tally.matched,
        "drawn": tally.truth - tally.matched, "ground_truth": tally.truth,
        "corrections": round(corrections, 3),
        "corrections_per_image": round(corrections / max(images, 1), 3),
        "effort_ratio": round(float(tally.ratio(settings)), 4),
        "precision": round(tally.matched / tally.offered, 4) if tally.offered else None,
        "recall": round(tally.matched / tally.truth, 4) if tally.truth else None,
    }


def per_image_costs(scored: Scored, per_class: dict[str, float | None],
                    settings: EffortSettings) -> tuple[np.ndarray, np.ndarray]:
    """(corrections, true boxes) of every image at these thresholds."""
    limits = np.array([np.inf if per_class.get(n) is None else per_class[n]
                       for n in scored.names] or [np.inf])
    offered = scored.score >= limits[scored.cls]
    matched = offered & (scored.overlap > 0)
    adjusted = matched & (scored.overlap < settings.keep_iou)
    per_image = [np.bincount(scored.image[mask], minlength=scored.images)
                 for mask in (offered, matched, adjusted)]
    truth = np.bincount(scored.truth_image, minlength=scored.images)
    tally = Tally(*per_image, truth)
    return tally.cost(settings).astype(float), truth.astype(float)


def folds_of(images: int, folds: int, seed: int = 0) -> np.ndarray:
    """Each image's fold, a fixed shuffle so that neighbouring images (one flight) spread."""
    order = np.random.default_rng(seed).permutation(images)
    fold = np.empty(images, int)
    fold[order] = np.arange(images) % max(1, min(folds, images))
    return fold


def cross_folds(scored: Scored, folds: int) -> Iterator[tuple[np.ndarray, Scored, Scored]]:
    """Per fold of the images: (its mask, the run on the other folds, the run on it)."""
    fold = folds_of(scored.images, folds)
    for f in np.unique(fold):
        held = fold == f
        yield held, scored.of_images(~held), scored.of_images(held)


def ratio_interval(cost: np.ndarray, truth: np.ndarray, settings: EffortSettings,
                   resamples: int = 1000, seed: int = 0, batch: int | None = None
                   ) -> tuple[float, float]:
    """95% percentile interval of sum(cost) / (draw_cost * sum(truth)) over images drawn
    with replacement: `len(cost)` of them, an interval for the expected ratio; `batch` of
    them, the range of the ratio on one batch of that many images like these, which a
    small batch of few animals spreads much wider."""
    if len(cost) == 0:
        return 1.0, 1.0
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(cost), size=(resamples, batch or len(cost)))
    ratios = cost[draws].sum(1) / (settings.draw_cost * np.maximum(truth[draws].sum(1), 1))
    low, high = np.percentile(ratios, [2.5, 97.5])
    return round(float(low), 4), round(float(high), 4)


def cross_fitted(scored: Scored, settings: EffortSettings = EffortSettings(),
                 batch: int | None = None) -> dict[str, Any]:
    """The effort ratio annotators would see on images the thresholds were not chosen on:
    per fold of the val images, thresholds chosen on the others and scored on it; with the
    95% interval over images (and with `batch`, `batch_low`/`batch_high`: the range to
    expect on one batch of that many images). What the deploy gate decides on. When the
    thresholds chosen on all of val offer nothing, nothing is left to flatter: annotators
    draw every box, a ratio of exactly 1."""
    chosen = choose_thresholds(scored, settings)["per_class"]
    if all(t is None for t in chosen.values()):
        return at_thresholds(scored, chosen, settings, batch)
    cost = np.zeros(scored.images)
    truth = np.bincount(scored.truth_image, minlength=scored.images).astype(float)
    folds = 0
    for mask, fit, held in cross_folds(scored, settings.folds):
        chosen = choose_thresholds(fit, settings)["per_class"]
        cost[mask] = per_image_costs(held, chosen, settings)[0]
        folds += 1
    return _ratio_figures(cost, truth, settings, folds=folds, batch=batch)


def at_thresholds(scored: Scored, per_class: dict[str, float | None],
                  settings: EffortSettings = EffortSettings(), batch: int | None = None
                  ) -> dict[str, Any]:
    """The effort ratio at fixed thresholds (a deployed model's, served as they are), with
    the same intervals as `cross_fitted`."""
    return _ratio_figures(*per_image_costs(scored, per_class, settings), settings, folds=0,
                          batch=batch)


def _ratio_figures(cost: np.ndarray, truth: np.ndarray, settings: EffortSettings,
                   folds: int, batch: int | None = None) -> dict[str, Any]:
    low, high = ratio_interval(cost, truth, settings)
    spread = {} if batch is None else dict(zip(
        ("batch_low", "batch_high"), ratio_interval(cost, truth, settings, batch=batch),
        strict=True))
    return {**spread, "effort_ratio": round(float(cost.sum() / (settings.draw_cost
                                                       * max(truth.sum(), 1))), 4),
            "low": low, "high": high, "corrections_per_image":
                round(float(cost.sum()) / max(len(cost), 1), 3),
            "ground_truth": int(truth.sum()), "images": len(cost), "folds": folds}


def curve(scored: Scored, settings: EffortSettings = EffortSettings()) -> list[dict[str, Any]]:
    """Effort ratio against the threshold, per class (for `dvc plots`)."""
    points = []
    for c, name in enumerate(scored.names):
        ratios = _tally(*scored.subset(c), PLOT_THRESHOLDS, settings).ratio(settings)
        points += [{"class": name, "threshold": float(t), "effort_ratio": round(float(v), 4)}
                   for t, v in zip(PLOT_THRESHOLDS, ratios, strict=True)]
    return points
