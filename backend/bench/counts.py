"""`tridentloop bench --counts`: do the published figures hold on surveys they were not fitted
on? Per seed a generated survey (92% empty tiles, herds, a rare species, look-alikes): the
model's count calibration, annotator thresholds and triage threshold chosen on `val_frames`
labelled frames, then applied to `survey_frames` new ones. Reports per seed and, over the
seeds, how often the 95% count interval held the true count (per class), how often the
out-of-sample effort interval held the effort measured on the new frames, and the triage
threshold's recall and the share of frames it spared. The model is the shipped source model
(savanna-v1) unless `--model` names another of the same biome's classes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import counts, effort
from ..detection.structures import Detections
from ..model_dir import ModelDir
from ..models import SAVANNA_V1
from ..synthetic import BIOMES, PoolSettings, Scene, coco_of, survey_pool


@dataclass(frozen=True)
class CountBench:
    model: Path = SAVANNA_V1
    biome: str = "savanna"
    seeds: int = 20
    val_frames: int = 30
    survey_frames: int = 30
    empty_fraction: float = 0.92
    device: str = "cpu"


def scored_frames(predictor: Any, model: ModelDir, frames: list[Scene],
                  names: tuple[str, ...], settings: effort.EffortSettings | None = None
                  ) -> tuple[list[Detections], effort.Scored]:
    """Each frame's detections, run by the model's recipe, and them matched to the truth."""
    from pipelines.evaluate import result_records

    found = [predictor.detect(frame.image, model.recipe) for frame in frames]
    coco = coco_of([(str(i), f.boxes, f.classes, f.image.shape[:2])
                    for i, f in enumerate(frames)], names)
    records = [r for i, det in enumerate(found) for r in result_records(det, i)]
    return found, effort.score_coco(coco, records, settings or effort.EffortSettings())


def _seed(bench: CountBench, seed: int, predictor: Any, model: ModelDir) -> dict[str, Any]:
    names = BIOMES[bench.biome].species
    settings = effort.EffortSettings()
    rng = np.random.default_rng(1000 + seed)
    pool = PoolSettings(biome=bench.biome, empty_fraction=bench.empty_fraction)
    val = scored_frames(predictor, model, survey_pool(rng, bench.val_frames, pool), names,
                        settings)[1]
    new = scored_frames(predictor, model, survey_pool(rng, bench.survey_frames, pool), names,
                        settings)[1]
    calibration = counts.calibrate_counts(val, settings.min_boxes)
    row: dict[str, Any] = {"seed": seed, "counts": {}}
    for c, name in enumerate(names):
        count = counts.class_count(new, c, calibration)
        row["counts"][name] = {"true": count["count_true"], **(
            {"estimate": None} if count["estimate"] is None else
            {**{k: round(count[k], 1) for k in ("estimate", "low", "high")},
             "covered": count["covered"]})}
    chosen = effort.choose_thresholds(val, settings)["per_class"]
    held = effort.cross_fitted(val, settings, batch=bench.survey_frames)
    fresh = effort.at_thresholds(new, chosen, settings)["effort_ratio"]
    # no val animals, or none new: no effort ratio to compare
    comparable = bool(len(val.truth_cls) and len(new.truth_cls))
    row["effort"] = {"out_of_sample": held["effort_ratio"], "low": held["low"],
                     "high": held["high"], "fresh": fresh,
                     "offered": any(t is not None for t in chosen.values()),
                     "covered": held["low"] <= fresh <= held["high"] if comparable else None,
                     # the range to expect on a batch of the new frames' size
                     "batch_low": held["batch_low"], "batch_high": held["batch_high"],
                     "batch_covered": (held["batch_low"] <= fresh <= held["batch_high"]
                                       if comparable else None)}
    triage = counts.triage_figures(new, counts.triage_threshold(val, 0.95))
    row["triage"] = {k: triage[k] for k in ("threshold", "skipped_share", "image_recall",
                                            "animals_in_skipped")}
    return row


def seed_interval(values: list[float], draws: int = 2000) -> dict[str, float] | None:
    """The mean over seeds with a 95% bootstrap interval (percentiles of resampled means):
    a figure from a few seeds carries its spread."""
    if not values:
        return None
    data = np.asarray(values, float)
    means = np.random.default_rng(0).choice(data, (draws, len(data))).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": round(float(data.mean()), 3), "low": round(float(low), 3),
            "high": round(float(high), 3), "seeds": len(data)}


def _effort_coverage(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How often the out-of-sample interval held the fresh batch's effort ratio: over the
    seeds with animals on both sides, and over those where the model offered boxes (the
    others offer nothing, a ratio of exactly 1 on both)."""
    defined = [r["effort"] for r in rows if r["effort"]["covered"] is not None]
    offered = [e for e in defined if e["offered"]]

    def share(es: list[dict[str, Any]], key: str = "covered") -> float | None:
        return round(float(np.mean([e[key] for e in es])), 3) if es else None

    return {"effort_interval_holds_fresh": share(defined), "effort_seeds": len(defined),
            "effort_seeds_offering": len(offered),
            "effort_interval_holds_fresh_when_offering": share(offered),
            "effort_batch_interval_holds_fresh": share(defined, "batch_covered"),
            "effort_batch_interval_holds_fresh_when_offering": share(offered, "batch_covered")}


def run_count_benchmark(bench: CountBench) -> Iterator[dict[str, Any]]:
    started = time.perf_counter()
    model = ModelDir.open(bench.model)
    predictor = model.predictor(device=bench.device)
    rows = []
    for seed in range(bench.seeds):
        rows.append(_seed(bench, seed, predictor, model))
        yield rows[-1]
    coverage = {}
    for name in BIOMES[bench.biome].species:
        trials = [r["counts"][name]["covered"] for r in rows if "covered" in r["counts"][name]]
        widths = [(r["counts"][name]["high"] - r["counts"][name]["low"])
                  / max(r["counts"][name]["true"], 1)
                  for r in rows if "covered" in r["counts"][name]]
        coverage[name] = {"covered": int(sum(trials)), "trials": len(trials),
                          "share": round(float(np.mean(trials)), 3) if trials else None,
                          "mean_width_over_true": round(float(np.mean(widths)), 2)
                          if widths else None}
    recalls = [r["triage"]["image_recall"] for r in rows if r["triage"]["image_recall"] is not None]
    triaged = [r["triage"] for r in rows if r["triage"]["threshold"] is not None]
    yield {"seeds": bench.seeds, "model": str(bench.model), "count_coverage": coverage,
           **_effort_coverage(rows),
           "triage_recall_mean": round(float(np.mean(recalls)), 3) if recalls else None,
           "triage_recall_min": min(recalls) if recalls else None,
           "triage_skipped_share_mean": round(float(np.mean(
               [r["triage"]["skipped_share"] for r in rows])), 3),
           # Over the seeds whose val held enough frames with animals to set a threshold:
           "triage_seeds": len(triaged),
           "triage_when_set": {key: seed_interval([t[key] for t in triaged if t[key] is not None])
                               for key in ("skipped_share", "image_recall",
                                           "animals_in_skipped")},
           "val_frames": bench.val_frames, "survey_frames": bench.survey_frames,
           "empty_fraction": bench.empty_fraction,
           "seconds": round(time.perf_counter() - started, 1)}
