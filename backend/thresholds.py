"""Which score a box needs to be offered to an annotator (or counted in a survey): per class,
as the model's `model.json` says (chosen on validation for the fewest corrections, see
`effort`), unless a person sets one number (Label Studio's `extra_params.score_threshold`,
a `--score-threshold` flag), which then holds for every class. A model without chosen
thresholds uses 0.5. Every user of a threshold says which one is in force."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .detection.structures import Detections
from .effort import NOT_OFFERED

DEFAULT = 0.5
METADATA_KEY = "score_thresholds"


@dataclass(frozen=True)
class ScoreThresholds:
    by_class: tuple[float, ...]  # by class id; classes beyond them take `fallback`
    fallback: float  # the pooled threshold: one number where a format has room for one
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
        pooled = float(stored.get("pooled", DEFAULT))
        per_class = stored.get("per_class", {})
        by_class = tuple(float(per_class.get(name, pooled)) for name in labels or ())
        return cls(by_class, pooled, "the model's, chosen on validation for annotator effort")

    def resolve(self, override: float | None, source: str) -> ScoreThresholds:
        """These, unless a person set one number for every class."""
        return self if override is None else ScoreThresholds.uniform(override, source)

    def of(self, class_id: int) -> float:
        return self.by_class[class_id] if 0 <= class_id < len(self.by_class) else self.fallback

    def offered(self, det: Detections) -> torch.Tensor:
        """Which detections are shown (score at or above their class's threshold)."""
        limits = torch.tensor([self.of(int(c)) for c in det.classes.tolist()],
                              dtype=det.scores.dtype)
        return det.scores >= limits

    def describe(self, labels: Sequence[str] | None = None) -> str:
        """`zebra 0.62, bird not offered (...)`: one line for the log."""
        if not self.by_class:
            return f"{self.fallback:g} for every class ({self.source})"
        names = list(labels or [f"class{i}" for i in range(len(self.by_class))])
        parts = [f"{name} {'not offered' if t >= NOT_OFFERED else f'{t:.3g}'}"
                 for name, t in zip(names, self.by_class, strict=False)]
        return f"{', '.join(parts)} ({self.source})"
