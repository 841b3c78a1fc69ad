"""Which score a box needs to be offered to an annotator: per class, as the model's
`model.json` says (chosen on validation for the fewest corrections, see `effort`; a class
may be not offered at all), unless a person sets one number (Label Studio's
`extra_params.score_threshold`, a `--score-threshold` flag), which then holds for every
class. A model without chosen thresholds uses 0.5. Every user of a threshold says which one
is in force. What a survey *counts* is another question, answered by `counts`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .detection.structures import Detections

DEFAULT = 0.5
METADATA_KEY = "score_thresholds"


def stored_threshold(value: Any) -> float | None:
    """A threshold as model.json holds it: null is "not offered"; so is a number no score
    reaches (models calibrated before "not offered" was stored explicitly wrote 1.01)."""
    return None if value is None or float(value) > 1.0 else float(value)


@dataclass(frozen=True)
class ScoreThresholds:
    by_class: tuple[float | None, ...]  # by class id (None: not offered); beyond: `fallback`
    fallback: float | None  # the pooled threshold
    source: str  # what set them, for log lines

    @classmethod
    def uniform(cls, value: float, source: str) -> ScoreThresholds:
        return cls((), float(value), source)

    @classmethod
    def of_model(cls, metadata: dict[str, Any], labels: Sequence[str] | None
                 ) -> ScoreThresholds:
        """The model's chosen thresholds, or DEFAULT for a model that has none."""
        stored = metadata.get(METADATA_KEY)
        if not stored:
            return cls.uniform(DEFAULT, f"the default {DEFAULT} (the model has no thresholds "
                               "chosen on validation; `tridentloop calibrate` chooses them)")
        pooled = stored_threshold(stored.get("pooled", DEFAULT))
        per_class = stored.get("per_class", {})
        by_class = tuple(stored_threshold(per_class[name]) if name in per_class else pooled
                         for name in labels or ())
        return cls(by_class, pooled, "the model's, chosen on validation for annotator effort")

    def resolve(self, override: float | None, source: str) -> ScoreThresholds:
        """These, unless a person set one number for every class."""
        return self if override is None else ScoreThresholds.uniform(override, source)

    def of(self, class_id: int) -> float | None:
        return self.by_class[class_id] if 0 <= class_id < len(self.by_class) else self.fallback

    @property
    def any_offered(self) -> bool:
        return any(t is not None for t in (*self.by_class, self.fallback))

    def offered(self, det: Detections) -> torch.Tensor:
        """Which detections are shown (score at or above their class's threshold)."""
        limits = [self.of(int(c)) for c in det.classes.tolist()]
        bounds = torch.tensor([float("inf") if t is None else t for t in limits],
                              dtype=det.scores.dtype)
        return det.scores >= bounds

    def describe(self, labels: Sequence[str] | None = None) -> str:
        """`zebra 0.62, bird not offered (...)`: one line for the log."""
        if not self.by_class:
            every = "nothing" if self.fallback is None else f"{self.fallback:g}"
            return f"{every} for every class ({self.source})"
        names = list(labels or [f"class{i}" for i in range(len(self.by_class))])
        parts = [f"{name} {describe_threshold(t, '.3g')}"
                 for name, t in zip(names, self.by_class, strict=False)]
        return f"{', '.join(parts)} ({self.source})"


def describe_threshold(threshold: float | None, spec: str = ".3f") -> str:
    """A class's threshold as people read it, "not offered" where there is none."""
    return "not offered" if threshold is None else format(threshold, spec)
