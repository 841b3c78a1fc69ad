"""`tridentloop bench --views`: what mirrored test-time views (`recipe.views`) give
annotators, and what they cost. Per seed a generated survey (92% empty tiles, herds, a rare
species, look-alikes): the model run with 1, 2 and 4 views, each way choosing its own
thresholds on `val_frames` labelled frames and scored on `survey_frames` new ones (the
effort ratio, kept, adjusted, deleted, drawn) with its seconds per frame. Over the seeds:
each way's mean with a 95% interval, its difference from one view paired by seed, and its
time as a ratio to one view's, all run side by side on the same frames. The surveys are
of the biome whose species the model's labels name (savanna-v1: the savanna; the demo's
models: the wetland).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import effort
from ..detection.views import VIEWS
from ..model_dir import ModelDir
from ..models import SAVANNA_V1
from ..synthetic import BIOMES, PoolSettings, survey_pool
from .counts import scored_frames, seed_interval


@dataclass(frozen=True)
class ViewsBench:
    model: Path = SAVANNA_V1
    seeds: int = 5
    val_frames: int = 30
    survey_frames: int = 30
    empty_fraction: float = 0.92
    device: str = "cpu"


def biome_of(model: ModelDir) -> str:
    """The generated biome whose species are the model's classes."""
    for name, biome in BIOMES.items():
        if list(biome.species) == list(model.labels or []):
            return name
    raise ValueError(f"model {model.path} detects {model.labels}, the species of no generated "
                     f"biome ({', '.join(f'{n}: {list(b.species)}' for n, b in BIOMES.items())})")


def _seed(bench: ViewsBench, seed: int, biome: str, model: ModelDir,
          predictors: dict[int, Any]) -> dict[str, Any]:
    names = BIOMES[biome].species
    rng = np.random.default_rng(2000 + seed)
    pool = PoolSettings(biome=biome, empty_fraction=bench.empty_fraction)
    val, new = survey_pool(rng, bench.val_frames, pool), survey_pool(rng, bench.survey_frames, pool)
    row: dict[str, Any] = {"seed": seed}
    for views, predictor in predictors.items():
        started = time.perf_counter()
        chosen = effort.choose_thresholds(scored_frames(predictor, model, val, names)[1])
        scored = scored_frames(predictor, model, new, names)[1]
        seconds = time.perf_counter() - started
        figures = effort.report(scored, chosen["per_class"])["overall"]
        row[f"views_{views}"] = {
            **{k: figures[k] for k in ("effort_ratio", "kept", "adjusted", "deleted", "drawn",
                                       "ground_truth")},
            "seconds_per_frame": round(seconds / (len(val) + len(new)), 4)}
    return row


def run_views_benchmark(bench: ViewsBench) -> Iterator[dict[str, Any]]:
    started = time.perf_counter()
    model = ModelDir.open(bench.model)
    biome = biome_of(model)
    predictors = {views: model.predictor(device=bench.device, views=views) for views in VIEWS}
    rows = []
    for seed in range(bench.seeds):
        rows.append(_seed(bench, seed, biome, model, predictors))
        yield rows[-1]

    def over_seeds(views: int, key: str) -> np.ndarray:
        return np.array([r[f"views_{views}"][key] for r in rows], float)

    summary: dict[str, Any] = {}
    for views in VIEWS:
        ratio = over_seeds(views, "effort_ratio")
        summary[f"views_{views}"] = {
            "effort_ratio": seed_interval(ratio.tolist()),
            **({} if views == 1 else {
                "minus_one_view": seed_interval((ratio - over_seeds(1, "effort_ratio")).tolist()),
                "time_ratio": round(float(over_seeds(views, "seconds_per_frame").sum()
                                          / over_seeds(1, "seconds_per_frame").sum()), 3)})}
    yield {"seeds": bench.seeds, "model": str(bench.model), "biome": biome, **summary,
           "val_frames": bench.val_frames, "survey_frames": bench.survey_frames,
           "empty_fraction": bench.empty_fraction, "device": bench.device,
           "seconds": round(time.perf_counter() - started, 1)}
