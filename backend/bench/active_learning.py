"""`tridentloop bench --active-learning`: does labelling what the model doubts beat labelling
at random? The loop is run twice on one generated pool, with the same seed, the same first
labelled images and the same label budget per round: once choosing each next batch as the
`select` stage does (its default uncertainty, spread across flights), once at random. Each
round fine-tunes the previous round's model on everything labelled so far, as `dvc repro`
does, and scores AP50 (pycocotools) on held-out scenes.

The pool is a survey of flights: scenes of common species (elephants, zebras) with a rare
one (birds, a few percent of the animals, in two flights out of eight), as real surveys are.

Prints one JSON line per round (`round`, `labels`: images labelled, `ap50_active`,
`ap50_random`) and a last one with `labels_saved_pct`: of the labels random selection needs
to reach active learning's final AP50 (linearly interpolated between rounds), the share
active learning did without. When random never reaches it within the budget, the figure is
a lower bound (`random_reached: false`, counted as if random reached it at its last round);
`fewer_labels_to_random_final_ap50_pct` then says how many fewer labels active learning
needed to reach random selection's final AP50.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import uncertainty
from ..detection.config import bundled_config, load_config
from ..detection.model import GeneralizedRCNN
from ..detection.predictor import Predictor
from ..detection.training import Sample, TrainOptions, init_from_scratch, train
from ..synthetic import CLASSES, coco_of, survey_scene

FLIGHTS = 8
COMMON = (1.0, 1.0, 0.0)  # elephants and zebras only
WITH_RARE = (1.0, 1.0, 0.35)  # birds too: the two flights where they live
RARE_FLIGHTS = (2, 5)


@dataclass(frozen=True)
class ActiveLearningBench:
    pool: int = 240  # unlabelled scenes, in FLIGHTS flights
    held_out: int = 60  # scenes AP50 is measured on
    initial: int = 8  # labelled before round 1, the same for both
    per_round: int = 8  # labelled after each round
    rounds: int = 5
    iterations: int = 80  # fine-tuning steps per round
    size: int = 320
    seed: int = 0
    device: str = "cpu"


@dataclass
class _Scenes:
    samples: list[Sample]
    flights: list[int]


def _scenes(count: int, size: int, rng: np.random.Generator) -> _Scenes:
    samples, flights = [], []
    for i in range(count):
        flight = i % FLIGHTS
        scene = survey_scene(rng, size, size, int(rng.integers(3, 9)), CLASSES,
                             WITH_RARE if flight in RARE_FLIGHTS else COMMON)
        samples.append(Sample(scene.image, scene.boxes, scene.classes))
        flights.append(flight)
    return _Scenes(samples, flights)


def _ap50(predictor: Predictor, held_out: _Scenes, coco: dict[str, Any]) -> float:
    from pipelines.evaluate import coco_metrics, result_records

    records = [r for i, sample in enumerate(held_out.samples)
               for r in result_records(predictor(sample.image), i)]
    return coco_metrics(coco, records)[0]["ap50"]


Chooser = Callable[[Predictor, list[int], int, np.random.Generator], list[int]]


def by_doubt(pool: _Scenes) -> Chooser:
    """What the `select` stage does: the default uncertainty per image, the batch taken
    from the flights in turn (most doubtful flight first) so one confusing flight cannot
    fill it."""
    from pipelines.select import spread

    def choose(predictor: Predictor, unlabelled: list[int], k: int,
               _rng: np.random.Generator) -> list[int]:
        scored = [{"id": i, "group": pool.flights[i], "uncertainty": uncertainty.score(
                       uncertainty.DEFAULT, [predictor(pool.samples[i].image)])}
                  for i in unlabelled]
        return [c["id"] for c in spread(scored, k)]

    return choose


def at_random(_predictor: Predictor, unlabelled: list[int], k: int,
              rng: np.random.Generator) -> list[int]:
    return [int(i) for i in rng.choice(unlabelled, size=k, replace=False)]


def _run(bench: ActiveLearningBench, pool: _Scenes, held_out: _Scenes, coco: dict[str, Any],
         choose: Chooser, name: str) -> list[tuple[int, float]]:
    """(images labelled, AP50) after each round."""
    rng = np.random.default_rng(bench.seed)
    labelled = [int(i) for i in rng.choice(len(pool.samples), bench.initial, replace=False)]
    torch.manual_seed(bench.seed)
    model = GeneralizedRCNN(load_config(bundled_config("tiny_tridentnet"))).to(bench.device)
    init_from_scratch(model)
    curve = []
    for round_no in range(1, bench.rounds + 1):
        options = TrainOptions(iterations=bench.iterations, batch_size=2, lr=0.01,
                               warmup_iters=10 if round_no == 1 else 0, crop_size=bench.size,
                               seed=bench.seed + round_no, workers=0)
        train(model, [pool.samples[i] for i in labelled], options)
        predictor = Predictor(model, device=bench.device)
        curve.append((len(labelled), _ap50(predictor, held_out, coco)))
        print(f"active-learning: {name} round {round_no}: {curve[-1][0]} images labelled, "
              f"AP50 {curve[-1][1]:.3f}", file=sys.stderr, flush=True)
        if round_no < bench.rounds:
            unlabelled = sorted(set(range(len(pool.samples))) - set(labelled))
            labelled += choose(predictor, unlabelled, bench.per_round, rng)
    return curve


def labels_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Images labelled when the curve first reaches `target` AP50, interpolated linearly
    between rounds (from (0, 0) before the first); None if it never does."""
    previous = (0, 0.0)
    for count, ap50 in curve:
        if ap50 >= target:
            low_count, low_ap = previous
            fraction = (target - low_ap) / (ap50 - low_ap) if ap50 > low_ap else 1.0
            return low_count + fraction * (count - low_count)
        previous = (count, ap50)
    return None


def labels_saved(active: list[tuple[int, float]], random: list[tuple[int, float]]
                 ) -> tuple[float, bool]:
    """(% of random's labels that active learning did without to reach its final AP50,
    whether random reached it at all within the budget)."""
    labels, target = active[-1]
    needed = labels_to_reach(random, target)
    reached = needed is not None
    needed = needed if needed is not None else float(random[-1][0])
    return round(100.0 * (needed - labels) / needed, 1), reached


def run_active_learning_benchmark(bench: ActiveLearningBench) -> Iterator[dict]:
    rng = np.random.default_rng(bench.seed)
    pool = _scenes(bench.pool, bench.size, rng)
    held_out = _scenes(bench.held_out, bench.size, rng)
    coco = coco_of([(f"{i}.png", x.boxes, x.classes, x.image.shape[:2])
                    for i, x in enumerate(held_out.samples)])
    started = time.perf_counter()
    active = _run(bench, pool, held_out, coco, by_doubt(pool), "uncertainty")
    random = _run(bench, pool, held_out, coco, at_random, "random")
    for round_no, ((labels, ap_active), (_, ap_random)) in enumerate(
            zip(active, random, strict=True), start=1):
        yield {"round": round_no, "labels": labels, "ap50_active": ap_active,
               "ap50_random": ap_random}
    saved, reached = labels_saved(active, random)
    # the other way round, always measurable: labels active learning needed to reach
    # random selection's final AP50, against random's
    active_needs = labels_to_reach(active, random[-1][1])
    fewer = (None if active_needs is None
             else round(100.0 * (random[-1][0] - active_needs) / random[-1][0], 1))
    yield {"labels_saved_pct": saved, "random_reached": reached,
           "fewer_labels_to_random_final_ap50_pct": fewer,
           "final_ap50_active": active[-1][1], "final_ap50_random": random[-1][1],
           "pool": bench.pool, "held_out": bench.held_out, "iterations_per_round":
           bench.iterations, "seconds": round(time.perf_counter() - started, 1)}
