"""`tridentloop bench --uncertainty-check`: does the score the loop ranks images by follow the
corrections an annotator then makes on them, on surveys whose ground truth was not drawn from
the model's own scores?

Per seed, a generated survey (92% empty tiles, herds, a rare species, look-alikes) and a
trained model (the shipped savanna-v1 on its own biome): annotator thresholds chosen on
`val_frames` labelled frames, as `calibrate` chooses them, then on `frames` new ones each
method's score against what an annotator does there at those thresholds: the corrections
(deletes, adjusts, draws, as `effort` counts them) and the realised error rate, corrections
per true animal (+1, as `error-rate` counts a prior object). Reports Spearman's rank
correlation per method, over seeds with its interval, and the spread of the scores: a score
stuck near one value cannot rank anything. A class the thresholds do not offer is reported
apart (its frames' error-rate, against the empty frames').
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import effort, uncertainty
from ..model_dir import ModelDir
from ..models import SAVANNA_V1
from ..synthetic import BIOMES, PoolSettings, Scene, survey_pool
from ..thresholds import ScoreThresholds
from .counts import scored_frames, seed_interval

CHECKED: tuple[uncertainty.Method, ...] = (
    "error-rate", "top-doubt", "least-confidence", "entropy", "likely-animals")


@dataclass(frozen=True)
class UncertaintyCheck:
    model: Path = SAVANNA_V1
    biome: str = "savanna"
    seeds: int = 3
    val_frames: int = 60
    frames: int = 150
    empty_fraction: float = 0.92
    device: str = "cpu"


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Rank correlation, ties given their mean rank; None when either side is constant."""
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, group = np.unique(x, return_inverse=True)
    return (np.bincount(group, ranks) / np.bincount(group))[group]


def _seed(check: UncertaintyCheck, seed: int, predictor: Any, model: ModelDir
          ) -> dict[str, Any]:
    names = BIOMES[check.biome].species
    rng = np.random.default_rng(2000 + seed)
    pool = PoolSettings(biome=check.biome, empty_fraction=check.empty_fraction)
    _, val = scored_frames(predictor, model, survey_pool(rng, check.val_frames, pool), names)
    per_class = effort.choose_thresholds(val)["per_class"]
    served = ScoreThresholds(tuple(per_class.get(n) for n in names), None,
                             "chosen on val for annotator effort")
    frames = survey_pool(rng, check.frames, pool)
    found, scored = scored_frames(predictor, model, frames, names)
    corrections, truth = effort.per_image_costs(scored, per_class, effort.EffortSettings())
    realised = corrections / (truth + 1)
    row: dict[str, Any] = {"seed": seed, "thresholds": per_class, "methods": {}}
    for method in CHECKED:
        scores = np.array([uncertainty.score(method, [d], served) for d in found])
        row["methods"][method] = {
            "spearman_error_rate": _rounded(spearman(scores, realised)),
            "spearman_corrections": _rounded(spearman(scores, corrections)),
            "spread": [round(float(q), 3) for q in np.percentile(scores, [5, 50, 95])],
            "distinct": len(np.unique(scores.round(4)))}
    error_rate = np.array([uncertainty.score("error-rate", [d], served) for d in found])
    row["not_offered"] = _not_offered(frames, names, per_class, error_rate)
    return row


def _not_offered(frames: list[Scene], names: tuple[str, ...],
                 per_class: dict[str, float | None], error_rate: np.ndarray
                 ) -> dict[str, Any]:
    """Per class the thresholds withhold: error-rate on the frames holding it (every animal
    there is to draw) against the empty frames'."""
    empty = np.array([not len(f.classes) for f in frames])
    found = {}
    for c, name in enumerate(names):
        holds = np.array([bool((f.classes == c).any()) for f in frames])
        if per_class.get(name) is None and holds.any():
            found[name] = {"frames": int(holds.sum()),
                           "error_rate_median": round(float(np.median(error_rate[holds])), 3),
                           "empty_frames_median": round(float(np.median(error_rate[empty])),
                                                        3)}
    return found


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def run_uncertainty_check(check: UncertaintyCheck) -> Iterator[dict[str, Any]]:
    started = time.perf_counter()
    model = ModelDir.open(check.model)
    predictor = model.predictor(device=check.device)
    rows = []
    for seed in range(check.seeds):
        rows.append(_seed(check, seed, predictor, model))
        yield rows[-1]
    yield {"spearman_over_seeds": {
               method: {key: seed_interval([r["methods"][method][key] for r in rows
                                            if r["methods"][method][key] is not None])
                        for key in ("spearman_error_rate", "spearman_corrections")}
               for method in CHECKED},
           "model": str(check.model), "biome": check.biome, "frames": check.frames,
           "val_frames": check.val_frames, "empty_fraction": check.empty_fraction,
           "seconds": round(time.perf_counter() - started, 1)}
