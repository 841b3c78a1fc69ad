"""`tridentloop demo` (`make demo`): the whole loop on an embedded default, on CPU.

A new survey as surveys are: a generated wetland (buffalo, hippo, a rare wattled crane),
cut into the loop's 320 px tiles, about 92% of them empty, with termite mounds and bushes
that look like animals (backend/synthetic.py). The loop starts from last season's model, the
shipped savanna-v1 (trained on a generated savanna survey of other species:
`train.base_weights`), with a new box predictor for this survey's species and its backbone
frozen (`train.freeze_at: 4`: it already sees these animals; only proposals and box head
learn, at over twice the steps per second). Each round a local Label Studio gets the next
tiles of the survey, as many as hold at least `--animals-per-round` animals (the first round
three times that), so that each round's effort figure rests on that many; once a model is
deployed, our backend pre-labels them through Label Studio's "Retrieve predictions"; a
scripted annotator keeps the pre-labels that match the generated ground truth, fixes the
rest, and submits; then `dvc repro` exports the
accepted labels, trains on all of them (going on from the loop's last model; the first
round from the start model), evaluates, and redeploys if the model is not worse for
annotators and for AP. The backend hot-reloads each new version and offers boxes by the
score thresholds `evaluate` chose for it on val. Every model runs each tile in four
mirrored views and fuses an animal's boxes (`recipe.views: 4`, detection/views.py).

What annotators feel is counted per round, by the same costs `evaluate` uses
(backend/effort.py): pre-labels kept, adjusted (a loose box's edges moved) and deleted,
animals drawn, and the effort ratio, corrections over drawing every animal (1.0: as costly
as drawing every box from scratch, as in round 1). What a survey gets from the served model
is reported too: the tiles its triage threshold says need not be opened (and the animals in
them), and its count with a 95% interval against the truth. One tile in 4 is pinned to
val, as a team holds out part of each flight. Prints a table per round and ends with one
JSON line `{"rounds": [...]}`; every server it started is stopped before it returns.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from label_studio_sdk import LabelStudio
from PIL import Image

from .effort import EffortSettings, Tally, match
from .imagery.counts import interval, survey_estimate
from .labelstudio.local import LocalLabelStudio, import_images, local_label_studio
from .labelstudio.results import rectangle_region
from .media.fetch import MediaFetcher, MediaSettings
from .models import SAVANNA_V1
from .registry import Registry
from .serving.backend import Backend, ServerSettings
from .serving.jobs import TrainingJobs
from .serving.model_source import ModelSource
from .serving.server import serve_in_thread
from .synthetic import BIOMES, PoolSettings, Scene, coco_of, label_config, png_bytes, survey_pool

MARKER = ".tridentloop-demo"
SURVEY = PoolSettings(biome="wetland", height=320, width=320)  # tiles, 92% empty
SPECIES = BIOMES[SURVEY.biome].species
IMAGE_SIZE = (SURVEY.height, SURVEY.width)
SETTINGS = EffortSettings()  # the costs evaluate scores the loop by
ANNOTATORS = 4  # annotations sent at once


def review(predicted: list[dict[str, Any]], scene: Scene
           ) -> tuple[list[dict[str, Any]], Tally]:
    """The scripted annotator, matching as `effort` does (per class, best score first): keep
    a pre-label on an animal from IoU `keep_iou`, move a looser one's edges onto it, delete
    the rest, draw the animals nobody found. Its result and its tally."""
    height, width = IMAGE_SIZE
    kept: list[dict[str, Any]] = []
    found = np.zeros(len(scene.boxes), bool)
    as_is = np.zeros(len(scene.boxes), bool)
    for c, name in enumerate(SPECIES):
        regions = [r for r in predicted if r["value"]["rectanglelabels"][0] == name]
        truth = np.flatnonzero(scene.classes == c)
        boxes = np.array([_corners(r["value"]) for r in regions], float).reshape(-1, 4)
        scores = np.array([r.get("score", 0.0) for r in regions], float)
        which, overlap = match(boxes, scores, scene.boxes[truth].astype(float), SETTINGS.iou)
        for region, j, iou in zip(regions, which, overlap, strict=True):
            if j >= 0:
                found[truth[j]] = True
                if iou >= SETTINGS.keep_iou:
                    as_is[truth[j]] = True
                    kept.append({k: val for k, val in region.items() if k != "score"})
    redrawn = [  # drawn from scratch, or a loose pre-label moved onto the animal
        rectangle_region(box, SPECIES[c], width, height)
        for box, c, keep in zip(scene.boxes.tolist(), scene.classes.tolist(), as_is, strict=True)
        if not keep
    ]
    return kept + redrawn, Tally(len(predicted), int(found.sum()),
                                 int((found & ~as_is).sum()), len(scene.boxes))


def _corners(value: dict[str, float]) -> list[float]:
    height, width = IMAGE_SIZE
    return [value["x"] * width / 100, value["y"] * height / 100,
            (value["x"] + value["width"]) * width / 100,
            (value["y"] + value["height"]) * height / 100]


def _prepare_output(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise ValueError(f"{out} exists and is not a demo output; choose another --output")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by tridentloop demo; removed by the next run\n")


def run_demo(args: argparse.Namespace) -> int:
    out: Path = args.output.absolute()
    _prepare_output(out)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    rounds: list[dict[str, Any]] = []
    with ExitStack() as stack:
        print("starting a local Label Studio (about a minute the first time)...", flush=True)
        ls_server = stack.enter_context(local_label_studio(out / "label-studio"))
        ls = LabelStudio(base_url=ls_server.url, api_key=ls_server.token)
        project = ls.projects.create(title="Wetland survey demo",
                                     label_config=label_config(SPECIES))
        env = {
            **os.environ,
            "LABEL_STUDIO_URL": ls_server.url,
            "LABEL_STUDIO_API_KEY": ls_server.token,
            "DVC_NO_ANALYTICS": "1",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        }
        from pipelines.workspace import create_loop_project

        loop_dir = create_loop_project(
            out / "loop", _loop_settings(args, ls_server.url, project.id), env)
        registry = Registry(loop_dir / "models/registry")
        held_out = _held_out_set(out / "held-out", np.random.default_rng(args.seed + 1))
        backend_url = None
        scenes: dict[str, Scene] = {}
        for round_no in range(1, args.rounds + 1):
            # the first batch larger, as a team labels one before any training: its val
            # quarter must hold enough animals for the gate to deploy a model
            animals = args.animals_per_round * (3 if round_no == 1 else 1)
            names = _import_round(rng, round_no, animals, ls_server, project.id, scenes)
            tasks = {t.data["image"].rsplit("-", 1)[-1]: t for t in ls.tasks.list(
                project=project.id)}
            new_ids = [tasks[n].id for n in names]
            _pin_val(ls, [tasks[n] for i, n in enumerate(names) if i % 4 == 0])
            if backend_url is None and registry.current_name() is not None:
                backend_url = _start_backend(
                    stack, registry, loop_dir, out, args, ls, project.id, ls_server
                )
            served = _served_thresholds(registry) if backend_url is not None else "none"
            survey = (_survey_figures(registry, [scenes[n] for n in names], args.device)
                      if backend_url is not None else {})
            if backend_url is not None:
                ls.actions.create(
                    id="retrieve_tasks_predictions",
                    project=project.id,
                    selected_items={"all": False, "included": new_ids},
                )
            tally = _label(ls, project.id,
                           [(scenes[n], t) for n, t in zip(names, new_ids, strict=True)],
                           predicted=backend_url is not None)
            herds = sum(bool(len(scenes[n].boxes)) for n in names)
            print(
                f"round {round_no}: {len(names)} new tiles ({herds} with animals), "
                f"{tally.truth} animals; {tally.offered} pre-labels offered, "
                f"{tally.matched - tally.adjusted} kept, {tally.adjusted} adjusted; dvc repro...",
                flush=True,
            )
            log = out / f"round{round_no}-dvc-repro.log"
            if _dvc_repro(loop_dir, env, log) != 0:
                raise RuntimeError(f"dvc repro failed in round {round_no}; see {log}")
            row = {**_round_row(round_no, loop_dir, registry, tally, len(names), served),
                   **survey}
            row["ap50"] = (_held_out_ap50(registry, held_out, args.device)
                           if registry.current_name() else 0.0)  # nothing deployed yet
            rounds.append(row)
            _print_table(rounds)
    _write_summary(out, rounds, time.perf_counter() - started)
    return 0


def _loop_settings(args: argparse.Namespace, url: str, project: int) -> dict[str, Any]:
    """params.yaml as the demo's survey team sets it."""
    return {
        "labelstudio": {"url": url, "project": project},
        # a new survey started from last season's model, as teams start; it sees
        # the wetland's animals already, so only the proposals and box head learn,
        # at twice the default rate, most crops around an animal (the tiles are
        # mostly empty ground)
        "train": {"iterations": args.iterations, "device": args.device,
                  "base_weights": str(SAVANNA_V1), "freeze_at": 4, "lr": 0.02,
                  "object_crops": 0.8},
        # each tile also run mirrored three ways, an animal's boxes fused: tighter
        # boxes (detection/views.py)
        "recipe": {"views": 4},
        "evaluate": {"device": args.device},
        "split": {"val_percent": 0},  # val: the tiles each round pins (below)
    }


def survey_tiles(rng: np.random.Generator, animals: int) -> list[Scene]:
    """The survey's next tiles, as many as hold at least `animals` animals: mostly empty
    ground and look-alikes, a herd here and there."""
    tiles: list[Scene] = []
    held = 0
    while held < animals:
        tiles += survey_pool(rng, 1, SURVEY)
        held += len(tiles[-1].boxes)
    return tiles


def _import_round(rng: np.random.Generator, round_no: int, animals: int, ls_server: Any,
                  project: int, scenes: dict[str, Scene]) -> list[str]:
    """A round's new tiles in Label Studio, uploaded together (see `survey_tiles`); their
    names."""
    tiles = {f"r{round_no}_tile{i:03d}.png": t for i, t in enumerate(survey_tiles(rng, animals))}
    scenes.update(tiles)
    import_images(ls_server, project, [(n, png_bytes(t.image)) for n, t in tiles.items()])
    return list(tiles)


def _pin_val(ls: LabelStudio, tasks: list[Any]) -> None:
    """Pin these tasks to val (their data's `split` field), as a team holds out part of each
    flight: the first round's val then holds a quarter of its tiles and, herds falling
    where they fall, 60 of its 153 animals in the default run, enough for the gate
    (`min_val_objects`) and for a common species' `min_boxes`, so its model can be deployed
    and pre-label the second round; and the empty tiles in it teach the thresholds what
    the look-alikes cost."""
    for task in tasks:
        ls.tasks.update(id=str(task.id), data={**task.data, "split": "val"})


def _label(ls: LabelStudio, project: int, work: list[tuple[Scene, int]], predicted: bool
           ) -> Tally:
    """The annotator's pass over the round's tasks (see `review`): what they kept,
    adjusted, deleted and drew, summed. The pre-labels are read in one listing (without a
    backend there are none), the annotations sent ANNOTATORS at a time, as several
    annotators would: one task after another, the round's requests took a minute."""
    shown: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for prediction in ls.predictions.list(project=project) if predicted else []:
        shown[prediction.task] += prediction.result
    reviewed = [(task_id, *review(shown[task_id], scene)) for scene, task_id in work]
    with ThreadPoolExecutor(ANNOTATORS) as pool:
        list(pool.map(lambda item: ls.annotations.create(id=item[0], result=item[1],
                                                         was_cancelled=False), reviewed))
    return sum((one for _, _, one in reviewed), Tally(0, 0, 0, 0))


def _write_summary(out: Path, rounds: list[dict[str, Any]], seconds: float) -> None:
    fields = ("round", "model_version", "labels", "ap50", "objects", "pre_labels_offered",
              "pre_labels_kept", "pre_labels_adjusted", "corrections", "effort_ratio",
              "images_not_opened", "count", "count_low", "count_high", "count_true")
    summary = {"rounds": [{k: r.get(k) for k in fields} for r in rounds]}
    (out / "summary.json").write_text(json.dumps(
        {**summary, "details": rounds, "seconds": round(seconds)}, indent=2) + "\n")
    print(json.dumps(summary))


def _start_backend(
    stack: ExitStack,
    registry: Registry,
    loop_dir: Path,
    out: Path,
    args: argparse.Namespace,
    ls: LabelStudio,
    project: int,
    ls_server: LocalLabelStudio,
) -> str:
    backend = Backend(
        ModelSource(registry=registry, device=args.device),
        MediaFetcher(
            MediaSettings(
                label_studio_url=ls_server.url,
                api_key=ls_server.token,
                cache_dir=out / "backend-cache",
            )
        ),
        TrainingJobs("dvc repro", loop_dir, out / "jobs"),
        ServerSettings(),  # boxes offered by each version's own thresholds
    )
    url = stack.enter_context(serve_in_thread(backend))
    ls.ml.create(project=project, url=url, title="tridentloop")
    print(
        f"backend {url} serving {backend.models.get().version}, connected to Label Studio",
        flush=True,
    )
    return url


def _held_out_set(root: Path, rng: np.random.Generator, animals: int = 40) -> dict[str, Any]:
    """Survey tiles never shown to Label Studio, empty ones included: the same yardstick
    for every round."""
    root.mkdir(parents=True)
    scenes = []
    for i, tile in enumerate(survey_tiles(rng, animals)):
        Image.fromarray(tile.image).save(root / f"held_out{i}.png")
        scenes.append((f"held_out{i}.png", tile.boxes, tile.classes, IMAGE_SIZE))
    return {"coco": coco_of(scenes, SPECIES), "dir": root}


def _held_out_ap50(registry: Registry, held_out: dict[str, Any], device: str) -> float:
    from pipelines.evaluate import coco_metrics, detections_for

    model = registry.current()
    records = detections_for(model, held_out["coco"], held_out["dir"], model.recipe, device)
    return coco_metrics(held_out["coco"], records)[0]["ap50"]


def _served_thresholds(registry: Registry) -> str:
    model = registry.current()
    thresholds = model.thresholds
    if not thresholds.by_class:
        return f"{thresholds.fallback:g}"
    return " ".join(f"{name[:1]}{'-' if t is None else f'{t:.2f}'}"
                    for name, t in zip(model.labels or [], thresholds.by_class, strict=False))


def _survey_figures(registry: Registry, scenes: list[Scene], device: str) -> dict[str, Any]:
    """What the served model tells a survey of these tiles: how many need not be opened
    (below its triage threshold) and the animals in them, and its count with a 95% interval
    (every class, by its count calibration) against the truth."""
    model = registry.current()
    predictor = model.predictor(device=device)
    counting = model.counting
    triage = model.triage_threshold
    counted = np.zeros(len(model.labels or SPECIES), int)
    skipped = missed = 0
    for scene in scenes:
        det = predictor.detect(scene.image, model.recipe)
        if triage is not None and det.best_score() < triage:
            skipped, missed = skipped + 1, missed + len(scene.boxes)
        for score, cls in zip(det.scores.tolist(), det.classes.tolist(), strict=True):
            counted[cls] += score >= counting.of(cls)
    mean, sd = survey_estimate(counted, len(scenes), counting)[1] or (float(counted.sum()), 0.0)
    low, high = interval(mean, sd)
    return {"images_not_opened": skipped, "animals_not_opened": missed,
            "count": round(mean, 1), "count_low": round(low, 1), "count_high": round(high, 1),
            "count_true": sum(len(s.boxes) for s in scenes)}


def _round_row(
    round_no: int, loop_dir: Path, registry: Registry, tally: Tally, images: int, served: str,
) -> dict[str, Any]:
    manifest = json.loads((loop_dir / "data/dataset/manifest.json").read_text())
    metrics = json.loads((loop_dir / "metrics.json").read_text())
    decision = json.loads((loop_dir / "deploy.json").read_text())
    deployed = metrics["deployed"]
    val_ap50 = metrics["ap50"] if decision["deployed"] or deployed is None else deployed["ap50"]
    corrections = float(tally.cost(SETTINGS))
    return {
        "round": round_no,
        "model_version": registry.current_name() or "-",
        "labels": manifest["boxes"],
        "images": manifest["images"],
        "val_ap50": val_ap50,
        "candidate_ap50": metrics["ap50"],
        "deployed": decision["deployed"],
        "objects": tally.truth,
        "pre_labels_offered": tally.offered,
        "pre_labels_kept": tally.matched - tally.adjusted,
        "pre_labels_adjusted": tally.adjusted,
        "corrections": corrections,
        "corrections_per_image": round(corrections / images, 2),
        "effort_ratio": round(float(tally.ratio(SETTINGS)), 3),
        "served_thresholds": served,
    }


_SHOWN = ("Running stage", "exported ", "train:", "evaluate:", "deploy", "select:")


def _dvc_repro(loop_dir: Path, env: dict[str, str], log: Path) -> int:
    """`dvc repro`, its whole output to `log` and its progress lines (stages, training
    iterations with loss and ETA, AP50, the deploy decision) to the console as they come."""
    with log.open("w") as saved, subprocess.Popen(
        ["dvc", "repro"], cwd=loop_dir, env=env, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            saved.write(line)
            if line.lstrip().startswith(_SHOWN) or "effort ratio" in line:
                print(f"    {line.strip()}", flush=True)
    return proc.returncode


def _print_table(rounds: list[dict[str, Any]]) -> None:
    """One row per round: data, model, AP, what the round's annotator went through with the
    pre-labels served then (thresholds: each class's first letter, '-' not offered), and
    what the served model told the survey of that batch (tiles not to open, the count)."""
    print(
        f"\n{'round':>5} {'images':>7} {'labels':>7} {'model':>7} {'AP50 held-out':>14} "
        f"{'AP50 val':>9} {'offered':>8} {'kept':>5} {'adj.':>5} {'corr./img':>10} "
        f"{'effort':>7} {'not opened':>11} {'count [95%] (true)':>22}  served thresholds"
    )
    for r in rounds:
        count = ("-" if r.get("count") is None else
                 f"{r['count']:.0f} [{r['count_low']:.0f}, {r['count_high']:.0f}] "
                 f"({r['count_true']})")
        opened = "-" if r.get("images_not_opened") is None else (
            f"{r['images_not_opened']} ({r['animals_not_opened']} an.)")
        print(
            f"{r['round']:>5} {r['images']:>7} {r['labels']:>7} {r['model_version']:>7} "
            f"{r['ap50']:>14.3f} {r['val_ap50']:>9.3f} {r['pre_labels_offered']:>8} "
            f"{r['pre_labels_kept']:>5} {r['pre_labels_adjusted']:>5} "
            f"{r['corrections_per_image']:>10.2f} {r['effort_ratio']:>7.3f} {opened:>11} "
            f"{count:>22}  {r['served_thresholds']}"
        )
    print(flush=True)
