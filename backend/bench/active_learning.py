"""`tridentloop bench --active-learning`: which way of choosing the next images to label pays
on a survey as surveys are, and by how much, over seeds.

Per seed a new generated survey cut into 320 px tiles (what an annotator opens): `pool`
tiles to choose from and `held_out` tiles to score on, 92% of them empty, herds, a rare
species, look-alikes, in flights of tiles. Every strategy starts as a new survey does: from
last season's model (the shipped savanna-v1) with a new box predictor for the survey's
species, nothing labelled. Each round a strategy picks `per_round` tiles, they are labelled
(their exact ground truth), and the model is fine-tuned on everything labelled so far from
the previous round's model, with the loop's own training settings (params.yaml `train`), as
`dvc repro` does; then scored on the held-out tiles.

Strategies, each as the `select` stage would choose (`uncertainty` score, `diversity`):
`default` (the loop's params.yaml `select` settings), `random`, and each component alone:
`likely-animals`, `error-rate` (doubt), `rare-animals` (likely animals weighted by their
class's rarity among the boxes labelled so far), `embeddings` (spread by the model's view of
the tiles, no score). Before anything is trained a scored strategy ranks by the start
model's likely animals, as `select` does on a cold start.

Per round, the mean over seeds and its 95% bootstrap interval of: held-out AP50, the rare
species' held-out AP50, the annotator effort ratio on held-out tiles (thresholds chosen
out of sample, as the deploy gate scores), animals per tile in the batch just labelled, the
share of the pool's animals labelled so far, and rare animals labelled so far. Headline,
per strategy against random, each over seeds with its interval: the area under the AP50
curve; the tiles it needs to reach random's final AP50 and random's final effort ratio (the
first crossing after which the curve stays there, so a curve that touches the target and
falls back does not count); animals per tile in the first two batches, as a ratio to
random's.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .. import effort, uncertainty
from ..detection.checkpoint import load_weights, predictor_state
from ..detection.device import resolve_device
from ..detection.model import GeneralizedRCNN
from ..detection.predictor import Predictor
from ..detection.structures import Detections
from ..detection.training import Sample, train
from ..model_dir import ModelDir
from ..models import SAVANNA_V1
from ..synthetic import BIOMES, PoolSettings, Scene, coco_of, survey_pool
from .counts import seed_interval

FLIGHTS = 8  # tiles are filed by flight, i mod 8: what `diversity: folders` spreads over
STRATEGIES = ("default", "random", "likely-animals", "error-rate", "rare-animals",
              "embeddings")
COLD_START: uncertainty.Method = "likely-animals"  # select's rule before anything is trained


@dataclass(frozen=True)
class ActiveLearningBench:
    seeds: int = 5
    first_seed: int = 0  # another run's surveys: seeds first_seed .. first_seed + seeds - 1
    strategies: tuple[str, ...] = STRATEGIES
    biome: str = "steppe"
    empty_fraction: float = 0.92
    rare_share: float = 0.05
    pool: int = 160  # tiles to choose from
    held_out: int = 80  # tiles scored on
    per_round: int = 16  # tiles labelled per round
    rounds: int = 3
    # fine-tuning steps per round: the loop's 150 (params.yaml) x 16 models x 5 seeds take
    # ~2 h on 2 CPU cores (estimated); 40 fit the hour. On a GPU give --iterations 150
    iterations: int | None = 40
    start: Path = SAVANNA_V1
    device: str = "cpu"
    jobs: int = 2  # processes, each a share of the CPU threads: small models use 2 threads
    # poorly, two 1-thread processes train 1.65x as fast on 2 cores


@dataclass(frozen=True)
class Strategy:
    score: uncertainty.Method | None  # None: no score (random draws; embeddings alone)
    diversity: str  # folders, embeddings or none
    pool_factor: int = 4


def loop_params() -> dict[str, Any]:
    """The settings a new loop project gets (`tridentloop init`)."""
    import pipelines

    return yaml.safe_load((Path(pipelines.__file__).parent / "loop/params.yaml").read_text())


def strategy(name: str, select: dict[str, Any]) -> Strategy:
    if name == "default":
        return Strategy(select.get("uncertainty", uncertainty.DEFAULT),
                        select.get("diversity", "folders"), int(select.get("pool_factor", 4)))
    if name == "random":
        return Strategy(None, "none")
    if name == "embeddings":
        return Strategy(None, "embeddings")
    if name in uncertainty.METHODS:
        return Strategy(name, "none")
    raise ValueError(f"--strategies: unknown {name!r}; choose from {', '.join(STRATEGIES)}")


@dataclass
class _Model:
    """A model of one seed's run, what it found on the held-out tiles and, once asked, on
    the pool."""

    state: dict[str, torch.Tensor]
    metrics: dict[str, float | None]
    detections: list[Detections] | None = None
    embeddings: torch.Tensor | None = None


class _Survey:
    """One seed: the tiles, the start model, and every model trained on them, keyed by the
    batches it was trained on in order (strategies that chose the same batches share it)."""

    def __init__(self, bench: ActiveLearningBench, seed: int) -> None:
        self.bench, self.seed = bench, seed
        self.names = BIOMES[bench.biome].species
        tiles = survey_pool(np.random.default_rng(seed), bench.pool + bench.held_out,
                            PoolSettings(biome=bench.biome, height=320, width=320,
                                         empty_fraction=bench.empty_fraction,
                                         rare_share=bench.rare_share))
        self.pool, self.held = tiles[:bench.pool], tiles[bench.pool:]
        self.coco = coco_of([(str(i), t.boxes, t.classes, t.image.shape[:2])
                             for i, t in enumerate(self.held)], self.names)
        self.held_rare = _animals(self.held, len(self.names) - 1) > 0
        params = loop_params()
        self.select = params["select"]
        start = ModelDir.open(bench.start)
        self.config = start.config
        self.options = _train_options(params, start, bench)
        model = GeneralizedRCNN(self.config)
        load_weights(model, start.weights, for_inference=False)
        if start.labels != list(self.names):  # a new survey's species: a new head
            model.roi_heads.box_predictor.start_from_other_classes(
                predictor_state(start.weights))
        self.models: dict[tuple, _Model] = {(): self._scored(model)}

    def _scored(self, model: GeneralizedRCNN) -> _Model:
        predictor = Predictor(model, device=self.bench.device)
        from pipelines.evaluate import coco_metrics, result_records

        records = [r for i, tile in enumerate(self.held)
                   for r in result_records(predictor(tile.image), i)]
        summary = coco_metrics(self.coco, records)[0]
        scored = effort.score_coco(self.coco, records)
        rare = summary["per_class_ap"].get(self.names[-1])
        return _Model({k: v.detach().clone() for k, v in model.state_dict().items()},
                      {"ap50": summary["ap50"], "effort_ratio":
                       effort.cross_fitted(scored)["effort_ratio"] if len(scored.truth_cls)
                       else None,
                       "rare_ap50": rare if self.held_rare else None})

    def model(self, batches: tuple[tuple[int, ...], ...]) -> _Model:
        """The model after labelling `batches` in turn: the one before it, fine-tuned on all
        of them."""
        if batches not in self.models:
            net = GeneralizedRCNN(self.config).to(resolve_device(self.bench.device))
            net.load_state_dict(self.model(batches[:-1]).state)
            labelled = [i for batch in batches for i in batch]
            options = dataclasses.replace(self.options, seed=self.seed * 100 + len(batches))
            train(net, [Sample(self.pool[i].image, self.pool[i].boxes, self.pool[i].classes)
                        for i in labelled], options)
            self.models[batches] = self._scored(net)
        return self.models[batches]

    def predictor(self, found: _Model) -> Predictor:
        net = GeneralizedRCNN(self.config)
        net.load_state_dict(found.state)
        return Predictor(net, device=self.bench.device)

    def pool_detections(self, found: _Model) -> list[Detections]:
        if found.detections is None:
            predictor = self.predictor(found)
            found.detections = [predictor(tile.image) for tile in self.pool]
        return found.detections

    def pool_embeddings(self, found: _Model) -> torch.Tensor:
        if found.embeddings is None:
            predictor = self.predictor(found)
            found.embeddings = torch.stack([predictor.embed(tile.image) for tile in self.pool])
        return found.embeddings


def _train_options(params: dict[str, Any], start: ModelDir, bench: ActiveLearningBench
                   ) -> Any:
    """The train stage's settings, in this process (no loader workers)."""
    from pipelines.train import train_options

    options = train_options(params["train"], start.recipe, start.config)
    return dataclasses.replace(options, workers=0, **(
        {"iterations": bench.iterations} if bench.iterations is not None else {}))


def choose(survey: _Survey, how: Strategy, batches: tuple[tuple[int, ...], ...],
           rng: np.random.Generator) -> tuple[int, ...]:
    """The next batch, as `select` would choose it with the model trained on `batches`."""
    k = survey.bench.per_round
    labelled = {i for batch in batches for i in batch}
    unlabelled = [i for i in range(len(survey.pool)) if i not in labelled]
    if how.score is None and how.diversity == "none":
        return tuple(int(i) for i in rng.choice(unlabelled, size=k, replace=False))
    from pipelines.select import diverse, spread

    found = survey.model(batches)
    candidates = [{"id": i, "group": i % FLIGHTS, "uncertainty": 0.0} for i in unlabelled]
    if how.score is not None:
        method = how.score if batches else COLD_START
        detections = survey.pool_detections(found)
        weights = uncertainty.class_weights(list(survey.names), _labelled_boxes(survey,
                                                                              labelled))
        for c in candidates:
            c["uncertainty"] = uncertainty.score(method, [detections[c["id"]]],
                                                 weights=weights)
    if how.diversity == "folders":
        return tuple(c["id"] for c in spread(candidates, k))
    ranked = sorted(candidates, key=lambda c: (-c["uncertainty"], c["id"]))
    if how.diversity == "none":
        return tuple(c["id"] for c in ranked[:k])
    if how.score is not None:
        ranked = ranked[:how.pool_factor * k]
    vectors = survey.pool_embeddings(found)[[c["id"] for c in ranked]]
    return tuple(c["id"] for c in diverse(ranked, vectors, k))


def _labelled_boxes(survey: _Survey, labelled: set[int]) -> dict[str, int]:
    classes = [int(c) for i in labelled for c in survey.pool[i].classes]
    return {name: classes.count(c) for c, name in enumerate(survey.names)}


def run_strategy(survey: _Survey, name: str) -> list[dict[str, Any]]:
    """One row per round: what was labelled and how the model then scores."""
    how = strategy(name, survey.select)
    rng = np.random.default_rng([survey.seed, 1])
    batches: tuple[tuple[int, ...], ...] = ()
    rows = []
    for round_no in range(1, survey.bench.rounds + 1):
        batch = choose(survey, how, batches, rng)
        batches = (*batches, batch)
        labelled = [survey.pool[i] for b in batches for i in b]
        rows.append({"seed": survey.seed, "strategy": name, "round": round_no,
                     "images": len(labelled), "boxes": _animals(labelled),
                     "pool_animals_labelled": round(_animals(labelled)
                                                    / max(_animals(survey.pool), 1), 3),
                     "batch_animals_per_image": _animals([survey.pool[i] for i in batch])
                     / len(batch),
                     "rare_labelled": _animals(labelled, len(survey.names) - 1),
                     **survey.model(batches).metrics})
        print(f"active-learning: seed {survey.seed} {name} round {round_no}: "
              f"{rows[-1]['images']} tiles, {rows[-1]['boxes']} animals labelled, "
              f"AP50 {rows[-1]['ap50']:.3f}", file=sys.stderr, flush=True)
    return rows


def _animals(tiles: list[Scene], cls: int | None = None) -> int:
    return int(sum(len(t.classes) if cls is None else int((t.classes == cls).sum())
                   for t in tiles))


def labels_to_reach(curve: list[tuple[float, float]], target: float,
                    higher_is_better: bool = True) -> float | None:
    """Images labelled when the curve reaches `target` for good: the first crossing after
    which every later point stays at or beyond it, interpolated linearly from the point
    before; None if the curve does not end there."""
    sign = 1.0 if higher_is_better else -1.0
    points = [(x, sign * y) for x, y in curve]
    goal = sign * target
    first = None
    for i in range(len(points) - 1, -1, -1):
        if points[i][1] < goal:
            break
        first = i
    if first is None:
        return None
    if first == 0:
        return points[0][0]
    (x0, y0), (x1, y1) = points[first - 1], points[first]
    return x0 + (goal - y0) / (y1 - y0) * (x1 - x0)


def _curve(survey_start: dict[str, Any], rows: list[dict[str, Any]], key: str
           ) -> list[tuple[float, float]]:
    return [(0.0, survey_start[key]), *((r["images"], r[key]) for r in rows)]


def _ratio_interval(num: list[float], den: list[float], draws: int = 2000
                    ) -> dict[str, float | None] | None:
    """mean(num) / mean(den) over seeds, with a 95% bootstrap interval resampling seeds. A
    draw whose seeds' denominators are all 0 (random found nothing) has no finite ratio: if
    more than 2.5% do, the interval has no upper end (`high` None), not a huge number."""
    a, b = np.asarray(num, float), np.asarray(den, float)
    if not len(a) or b.mean() == 0:
        return None
    picks = np.random.default_rng(0).integers(0, len(a), (draws, len(a)))
    dens = b[picks].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(dens > 0, a[picks].mean(1) / dens, np.inf)
        low, high = np.percentile(ratios, [2.5, 97.5])  # nan between two infinities
    return {"mean": round(float(a.mean() / b.mean()), 2), "low": round(float(low), 2),
            "high": round(float(high), 2) if np.isfinite(high) else None, "seeds": len(a)}


def fewer_tiles(curves: dict[int, list[tuple[float, float]]],
                randoms: dict[int, list[tuple[float, float]]], higher: bool) -> dict[str, Any]:
    """% fewer tiles than random to reach random's final figure, per seed. Only the seeds
    where random ended beyond the start model's figure are compared: otherwise any curve
    "reaches" it with no labels at all. A compared seed whose curve does not end there counts
    as 0 (so the mean is an upper bound when `seeds_reached` < `seeds_compared`)."""
    savings, reached = [], 0
    for seed, curve in curves.items():
        (_, start), (final_x, final_y) = randoms[seed][0], randoms[seed][-1]
        if None in (start, final_y) or (final_y - start) * (1 if higher else -1) <= 0:
            continue
        needed = labels_to_reach([p for p in curve if p[1] is not None], final_y, higher)
        reached += needed is not None
        savings.append(0.0 if needed is None else 100.0 * (final_x - needed) / final_x)
    return {"pct_fewer_tiles": seed_interval(savings), "seeds_compared": len(savings),
            "seeds_reached": reached}


def bars(head: dict[str, Any], seeds: int) -> dict[str, str]:
    """Issue 30's bars, said in words, so that a run that cannot show one says so instead of
    leaving a reader to infer it: ≥ 30% fewer tiles to random's final AP50 (the interval's
    lower end above 0), measurable only where random improved on the start model in at least
    half the seeds (and 3); ≥ 2× random's animals per tile in the first two batches; no worse
    than random (the area under the AP50 curve minus random's, its interval reaching 0)."""
    reach = head["to_random_final_ap50"]
    compared, enough = reach["seeds_compared"], max(3, -(-seeds // 2))
    if compared < enough:
        fewer = (f"not measurable: random improved on the start model's AP50 in {compared} "
                 f"of {seeds} seeds (needs {enough})")
    else:
        saved = reach["pct_fewer_tiles"]
        fewer = "met" if saved["mean"] >= 30 and saved["low"] > 0 else "not met"
    animals = head["animals_per_tile_first_two_batches_vs_random"]
    aulc = head["aulc_ap50_minus_random"]
    return {"fewer_tiles_to_random_final_ap50": fewer,
            "animals_per_tile_2x_random": "not measurable: random found no animal"
            if animals is None else "met" if animals["mean"] >= 2 else "not met",
            "no_worse_than_random": "yes" if aulc["high"] >= 0 else "no: worse"}


def summarise(rows: list[dict[str, Any]], starts: dict[int, dict[str, Any]],
              bench: ActiveLearningBench) -> dict[str, Any]:
    by: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:  # rows come sorted by round
        by[(r["strategy"], r["seed"])].append(r)
    names = list(dict.fromkeys(r["strategy"] for r in rows))
    seeds = sorted(starts)
    per_round = []
    for round_no in range(1, bench.rounds + 1):
        line: dict[str, Any] = {"round": round_no, "images": round_no * bench.per_round}
        for name in names:
            got = [r for r in rows if r["strategy"] == name and r["round"] == round_no]
            line[name] = {key: seed_interval([r[key] for r in got if r[key] is not None])
                          for key in ("ap50", "rare_ap50", "effort_ratio",
                                      "batch_animals_per_image", "pool_animals_labelled",
                                      "rare_labelled")}
        per_round.append(line)
    headline: dict[str, Any] = {}
    if "random" in names:
        randoms = {s: _curve(starts[s], by[("random", s)], "ap50") for s in seeds}
        random_effort = {s: _curve(starts[s], by[("random", s)], "effort_ratio")
                         for s in seeds}
        first_two = {s: np.mean([r["batch_animals_per_image"] for r in by[("random", s)][:2]])
                     for s in seeds}
        for name in (n for n in names if n != "random"):
            mine = {s: by[(name, s)] for s in seeds}
            headline[name] = {
                "aulc_ap50_minus_random": seed_interval(
                    [np.mean([r["ap50"] for r in mine[s]])
                     - np.mean([r["ap50"] for r in by[("random", s)]]) for s in seeds]),
                "to_random_final_ap50": fewer_tiles(
                    {s: _curve(starts[s], mine[s], "ap50") for s in seeds}, randoms, True),
                "to_random_final_effort": fewer_tiles(
                    {s: _curve(starts[s], mine[s], "effort_ratio") for s in seeds},
                    random_effort, False),
                "animals_per_tile_first_two_batches_vs_random": _ratio_interval(
                    [np.mean([r["batch_animals_per_image"] for r in mine[s][:2]])
                     for s in seeds], [first_two[s] for s in seeds]),
            }
            headline[name]["bars"] = bars(headline[name], len(seeds))
    return {"per_round": per_round, "headline": headline,
            "start_model": {key: seed_interval([starts[s][key] for s in seeds
                                                if starts[s][key] is not None])
                            for key in ("ap50", "effort_ratio")}}


def _units(bench: ActiveLearningBench) -> list[tuple[int, tuple[str, ...]]]:
    """Work run apart: per seed, the strategies whose first batch is the start model's top
    likely animals (scored, no spread) together, as they share their first model; every
    other strategy alone."""
    select = loop_params()["select"]
    hows = {n: strategy(n, select) for n in bench.strategies}
    shared = tuple(n for n, h in hows.items() if h.score is not None and h.diversity == "none")
    groups = ([shared] if shared else []) + [(n,) for n in hows if n not in shared]
    # the longest first, so that the processes finish together
    seeds = range(bench.first_seed, bench.first_seed + bench.seeds)
    return [(seed, group) for group in groups for seed in seeds]


def _run_unit(bench: ActiveLearningBench, seed: int, names: tuple[str, ...], threads: int
              ) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    if threads:
        torch.set_num_threads(threads)
    survey = _Survey(bench, seed)
    rows = [row for name in names for row in run_strategy(survey, name)]
    return seed, survey.models[()].metrics, rows


def _results(bench: ActiveLearningBench) -> Iterator[tuple[int, dict[str, Any],
                                                           list[dict[str, Any]]]]:
    units = _units(bench)
    if bench.jobs <= 1:
        yield from (_run_unit(bench, seed, names, 0) for seed, names in units)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, torch.get_num_threads() // bench.jobs)
    with ProcessPoolExecutor(bench.jobs, mp_context=multiprocessing.get_context("spawn")
                             ) as pool:
        futures = [pool.submit(_run_unit, bench, seed, names, threads)
                   for seed, names in units]
        yield from (f.result() for f in as_completed(futures))


def run_active_learning_benchmark(bench: ActiveLearningBench) -> Iterator[dict]:
    started = time.perf_counter()
    rows, starts = [], {}
    for seed, start, found in _results(bench):
        starts[seed] = start
        rows += found
        yield from found
    rows.sort(key=lambda r: (r["seed"], bench.strategies.index(r["strategy"]), r["round"]))
    yield {**summarise(rows, starts, bench),
           "settings": {k: str(v) if isinstance(v, Path) else v
                        for k, v in dataclasses.asdict(bench).items()},
           "default_strategy": dataclasses.asdict(strategy("default", loop_params()["select"])),
           "seconds": round(time.perf_counter() - started, 1)}
