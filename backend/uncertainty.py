"""How unsure the model is about an image, as one number: the higher, the sooner a person
should label it. Scores are computed on every detection the model keeps (down to its own
SCORE_THRESH_TEST), not only on the boxes shown to annotators, because the doubtful ones
are exactly those below the display threshold.

- `least-confidence`: the most doubtful box decides. A box of score s is a yes/no call
  (object or background) whose doubt is 2 * min(s, 1 - s): 1 for a coin flip, 0 when
  certain. An image with no boxes scores 0.
- `entropy`: the total binary entropy H (bits) of the box scores, as 1 - 2^-H: several
  doubtful boxes outrank one, which `least-confidence` cannot tell apart (one coin flip
  scores 0.5, two 0.75).
- `error-rate` (default): the share of the image's objects the model is expected to get
  wrong. A box of score s shown (s at or above its class's threshold t: the model's own,
  or 0.5) is wrong with probability 1 - s, one not shown is a missed object with
  probability s; it is an object with probability s, so the score is
  sum(wrong) / (sum(s) + 1): expected errors per expected object, the
  +1 a prior object so that an image of a few faint boxes does not outrank everything. It
  does not saturate on dense scenes: a tile of 100 sure animals (0.95) and 5 coin flips
  scores 0.08, one with 50 coin flips 0.25 (top-doubt: 0.55 and 1.0, and on real dense
  tree-crown tiles 0.984-0.9986 for every tile), and it grows with the error a person will
  fix (tests/test_dense.py: on a generated dense pool of a calibrated model, Spearman 0.90
  against the realised error rate; top-doubt 0.59).
- `top-doubt`: the mean doubt of the image's K = 10 most doubtful boxes, a
  missing box counting 0: (1/K) * sum of the K largest 2 * min(s, 1 - s). The two above
  saturate on dense scenes: among hundreds of boxes one is always a coin flip (so
  least-confidence reads 0.997-0.99997 on every dense tile) and summed entropy reaches 1
  for any image with many weak boxes, so the ranking is a tie. This one reaches 1 only when
  ten boxes are coin flips, still orders dense images by how doubtful their worst boxes
  are, and ranks a sparse image by the doubt an annotator resolves there (one coin flip:
  0.1; five: 0.5). K bounds the work one image can claim, as a labelling batch does.
- `disagreement` (TridentNet): 1 - the score-weighted agreement between the fast branch's
  and all branches' detections (same class, IoU >= 0.5): 0 when the two views agree box for
  box, 1 when they share nothing.

- `likely-animals`: not a doubt but how many animals the image likely holds, whatever their
  class: E = sum(s) over the model's boxes (the expected count, were scores calibrated),
  as E / (E + 1). On a survey that is mostly empty ground, the frames with animals are the
  scarce ones a person must see first; a model trained on other species (last season's,
  the zoo's) can rank a new survey's pool by it before anything is labelled.
- `rare-animals`: likely animals with each box weighted by how rare its class is among the
  boxes labelled so far (`class_weights`: inverse frequency, add-one smoothed, mean 1 over
  the classes): E = sum(w_c * s) as E / (E + 1). A frame with one likely bird outranks one
  with a likely zebra when the labelled set holds 2 birds and 90 zebras; with no counts
  given every weight is 1 and it is `likely-animals`.

Every score lies in [0, 1]: Label Studio silently drops a prediction scored above 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from .detection.boxes import pairwise_iou
from .detection.predictor import Predictor
from .detection.structures import Detections
from .thresholds import ScoreThresholds

HALF = ScoreThresholds.uniform(0.5, "error-rate's default")
Method = Literal["error-rate", "top-doubt", "least-confidence", "entropy", "disagreement",
                 "likely-animals", "rare-animals"]
METHODS: tuple[Method, ...] = (
    "error-rate", "top-doubt", "least-confidence", "entropy", "disagreement", "likely-animals",
    "rare-animals",
)
DEFAULT: Method = "error-rate"
TOP_K = 10
_MATCH_IOU = 0.5


def _doubt(det: Detections) -> torch.Tensor:
    return 2 * torch.minimum(det.scores, 1 - det.scores)


def error_rate(det: Detections, thresholds: ScoreThresholds | None = None) -> float:
    s = det.scores.double()
    shown = (thresholds or HALF).offered(det)
    return float(torch.where(shown, 1 - s, s).sum() / (s.sum() + 1))


def least_confidence(det: Detections) -> float:
    if len(det) == 0:
        return 0.0
    return float(_doubt(det).max())


def top_doubt(det: Detections, k: int = TOP_K) -> float:
    doubts = _doubt(det).double()
    return float(doubts.topk(min(k, len(doubts))).values.sum() / k)


def likely_animals(det: Detections, weights: torch.Tensor | None = None) -> float:
    """`weights` (per class) make it `rare-animals`."""
    scores = det.scores.double()
    if weights is not None:
        scores = scores * weights.double()[det.classes]
    expected = float(scores.sum())
    return expected / (expected + 1)


def class_weights(labels: Sequence[str], labelled: Mapping[str, int]) -> torch.Tensor:
    """Per class of the model, (N + C) / (C * (n_c + 1)) for n_c of the N labelled boxes
    among C classes: the inverse of the class's smoothed share, 1 for every class when the
    labelled set is balanced, largest for a class nobody has labelled yet."""
    counts = torch.tensor([float(labelled.get(label, 0)) for label in labels],
                          dtype=torch.float64)
    return (counts.sum() + len(labels)) / (len(labels) * (counts + 1))


def entropy(det: Detections) -> float:
    s = det.scores.double().clamp(1e-12, 1 - 1e-12)
    bits = (-(s * s.log2()) - (1 - s) * (1 - s).log2()).sum()
    return float(1 - 2 ** (-bits))


def disagreement(a: Detections, b: Detections) -> float:
    """Greedy one-to-one matching, best scores first; matched pairs count min(score) twice
    towards agreement, out of the sum of all scores."""
    total = float(a.scores.sum() + b.scores.sum())
    if total == 0:
        return 0.0
    iou = pairwise_iou(a.boxes, b.boxes) if len(a) and len(b) else torch.zeros(len(a), len(b))
    iou[a.classes[:, None] != b.classes[None, :]] = 0
    agreement = 0.0
    taken = torch.zeros(len(b), dtype=torch.bool)
    for i in torch.argsort(a.scores, descending=True).tolist():
        candidates = torch.where(taken, 0.0, iou[i])
        if len(candidates) and candidates.max() >= _MATCH_IOU:
            j = int(candidates.argmax())
            taken[j] = True
            agreement += 2 * min(float(a.scores[i]), float(b.scores[j]))
    return max(0.0, 1.0 - agreement / total)


def score(method: Method, detections: Sequence[Detections],
          thresholds: ScoreThresholds | None = None,
          weights: torch.Tensor | None = None) -> float:
    """`detections[0]` is what the served model found; `disagreement` also needs
    `detections[1]`, the branch counterpart's view of the same image; `error-rate` counts
    errors at the thresholds in force (0.5 if not given); `rare-animals` weighs classes by
    `weights` (`class_weights`; none: all 1)."""
    if method == "error-rate":
        return error_rate(detections[0], thresholds)
    if method == "top-doubt":
        return top_doubt(detections[0])
    if method == "least-confidence":
        return least_confidence(detections[0])
    if method == "entropy":
        return entropy(detections[0])
    if method == "disagreement":
        return disagreement(detections[0], detections[1])
    if method == "likely-animals":
        return likely_animals(detections[0])
    if method == "rare-animals":
        return likely_animals(detections[0], weights)
    raise ValueError(f"unknown uncertainty method {method!r}; choose from {METHODS}")


def counterparts(method: Method, predictor: Predictor) -> list[Predictor]:
    """The extra predictors a method needs beside the served one."""
    if method != "disagreement":
        return []
    trident = predictor.cfg.trident
    if trident is None:
        raise ValueError(
            "uncertainty 'disagreement' compares TridentNet branches, but this model has no "
            "MODEL.TRIDENT section; use top-doubt, least-confidence or entropy"
        )
    # A fast model is compared with all its branches; an all-branch one with its middle
    # branch, which is what detectron2's TridentNet-Fast runs.
    other = -1 if trident.test_branch_idx >= 0 else trident.num_branch // 2
    cfg = dataclasses.replace(
        predictor.cfg, trident=dataclasses.replace(trident, test_branch_idx=other)
    )
    return [predictor.sharing_weights(cfg)]
