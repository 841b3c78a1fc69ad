"""DVC stage `select`: the next batch for annotators, the most informative images first.

Reads the project's unlabeled tasks and the uncertainty that `tridentloop prelabel` stored
as each task's prediction score, keeps the top `k`, and spreads them across groups (the
folder an image came from: a survey flight, a camera-trap station) by taking groups in turn,
each time its most uncertain image left, so one confusing flight cannot fill the whole
batch with near-duplicates. Tasks with no prediction of the ranking model are counted and
named in the output: pre-label them first.

The ranking model is the deployed one. Before anything is deployed (a cold start: the
first models rarely beat drawing, and the gate rightly holds them back) the pool is ranked
by the model the next training starts from, the last candidate, tagged
`candidate-<its weights' SHA-256 prefix>`; its predictions carry the uncertainty and no
boxes (`prelabel --rank-only`): they order the pool, annotators are shown nothing the gate
held back. Before anything is trained, the model training will start from
(`train.base_weights`: last season's, another project's) ranks the pool by the animals it
likely finds (`likely-animals`, whatever their class: its classes may not be this
project's), tagged `start-<SHA-256 prefix>`, so a mostly empty survey's first batch holds
the frames with animals. With no model at all the batch is a spread sample: every group in
turn, a fixed pseudo-random order within each.
A batch is never empty while unlabeled tasks exist; the console says how it was chosen.
With `uncertainty: rare-animals` the pool is scored with the boxes labelled so far per
label (a task keeps the score of the counts it was scored with until the model changes).
With `diversity: embeddings` the batch is spread by what the ranking model sees instead of
by folder: the `pool_factor` × k highest scored are embedded (`Predictor.embed`), and each
next pick is the one whose score times its distance to the picks so far is largest, so a
batch is not k views of one herd however the images are filed.

Writes `data/select/next.json` and, with `create_view`, a Data Manager tab in Label Studio
filtered to the batch and sorted by uncertainty.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backend.files import file_sha256
from backend.labelstudio.tasks import is_labeled, list_tasks
from backend.labelstudio.views import show_tasks
from backend.media.fetch import MediaSettings
from backend.model_dir import ModelDir, ModelDirError
from backend.prelabel.sources import Item, TaskLoader
from backend.registry import Registry
from backend.uncertainty import DEFAULT as DEFAULT_UNCERTAINTY
from backend.weights import StartError, resolve_start

from .coco import write_json
from .params import fail, label_studio_target, load_params, open_label_studio

VIEW_TITLE = "tridentloop: label next"


def group_of(image: str) -> str:
    """The folder an image came from (uploads share one: `/data/upload/<project>`)."""
    path = image.split("?d=", 1)[-1].split("?", 1)[0]
    return path.rsplit("/", 1)[0] if "/" in path else ""


def spread(candidates: list[dict[str, Any]], k: int, key: str = "uncertainty"
           ) -> list[dict[str, Any]]:
    """Top `k` by `key`, taken from the groups in turn (the group of the highest first)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in sorted(candidates, key=lambda c: (-c[key], c["id"])):
        groups[c["group"]].append(c)
    queues = sorted(groups.values(), key=lambda g: (-g[0][key], g[0]["id"]))
    chosen: list[dict[str, Any]] = []
    while len(chosen) < k and any(queues):
        for queue in queues:
            if queue and len(chosen) < k:
                chosen.append(queue.pop(0))
    return chosen


def _draw(task_id: int, seed: int) -> float:
    """A fixed pseudo-random number in [0, 1) per task: the same sample on every run."""
    digest = hashlib.sha256(f"{seed}:{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def spread_sample(tasks: list[dict[str, Any]], k: int, data_key: str, seed: int = 0
                  ) -> list[dict[str, Any]]:
    """With no model to rank by: `k` unlabeled tasks, every group (flight, station) in
    turn, a fixed pseudo-random order within each."""
    pool = []
    for task in tasks:
        if is_labeled(task):
            continue
        image = str((task.get("data") or {}).get(data_key, ""))
        pool.append({"id": task["id"], "image": image, "group": group_of(image),
                     "draw": _draw(task["id"], seed)})
    return spread(pool, k, key="draw")


def diverse(candidates: list[dict[str, Any]], embeddings: torch.Tensor, k: int
            ) -> list[dict[str, Any]]:
    """`k` of the candidates (rows of `embeddings`, one per candidate): the highest
    scored first, then each time the largest score x distance to the nearest pick, the
    distance (1 - cosine) / 2 of embeddings centred on the candidates' mean (what they all
    share, the ground, says nothing about which differ)."""
    if not candidates:
        return []
    centred = torch.nn.functional.normalize(embeddings - embeddings.mean(0), dim=1)
    scores = torch.tensor([c["uncertainty"] for c in candidates], dtype=torch.float32)
    nearest = torch.full((len(candidates),), 1.0)
    chosen: list[int] = []
    for _ in range(min(k, len(candidates))):
        value = (scores + 1e-3) * nearest  # +1e-3: unscored candidates still spread
        value[chosen] = -1.0
        pick = int(value.argmax())
        chosen.append(pick)
        nearest = torch.minimum(nearest, (1 - centred @ centred[pick]) / 2)
    return [candidates[i] for i in chosen]


@dataclass(frozen=True)
class Ranking:
    """The model that ranks the pool: its predictions' version tag, prelabel's arguments to
    run it, what it is (for the console), the score it ranks by and its directory."""

    version: str
    model: list[str]
    what: str
    uncertainty: str
    model_dir: Path


def ranking_model(params: dict[str, Any]) -> Ranking | None:
    """The deployed model, else the last candidate, else the model training will start
    from (`train.base_weights`, when it is a model directory or registry), else None."""
    doubt = params.get("select", {}).get("uncertainty", DEFAULT_UNCERTAINTY)
    registry = params["deploy"]["registry"]
    version = Registry(registry).current_name()
    if version is not None:
        return Ranking(version, ["--registry", registry], f"the deployed model {version}",
                       doubt, Registry(registry).versions_dir / version)
    output = params.get("train", {}).get("output", "models/candidate")
    try:
        candidate = ModelDir.open(output)
    except ModelDirError:
        return _start_ranking(str(params.get("train", {}).get("base_weights") or ""))
    tag = f"candidate-{file_sha256(candidate.weights)[:12]}"
    return Ranking(tag, ["--model", output, "--model-version", tag, "--rank-only"], (
        f"the last candidate {tag} (nothing is deployed yet: it orders the pool, its "
        "predictions carry no boxes)"), doubt, Path(output))


def _start_ranking(base_weights: str) -> Ranking | None:
    """Before anything is trained: the start model, a detector that may know other species
    (last season's, another project's), ranks by likely animals, the scarce frames of a
    mostly empty survey first; its doubt is about classes this project may not have."""
    if not base_weights or "://" in base_weights:
        return None  # a bare checkpoint or a download: no model directory to run
    try:
        start = resolve_start(base_weights)
    except StartError:
        return None  # train will say what is wrong with it
    if start.labels is None:
        return None
    tag = f"start-{start.sha256[:12]}"
    return Ranking(tag, ["--model", str(start.weights.parent), "--model-version", tag,
                         "--rank-only"],
                   f"the start model {base_weights} ({tag}: nothing is trained yet; by the "
                   "animals it likely finds in each image, whatever their class)",
                   "likely-animals", start.weights.parent)


def candidates(tasks: list[dict[str, Any]], version: str, data_key: str):
    """Unlabeled tasks with this version's uncertainty, and those still without one."""
    found, missing = [], []
    for task in tasks:
        if is_labeled(task):
            continue
        scores = [p.get("score") for p in task.get("predictions") or []
                  if p.get("model_version") == version and p.get("score") is not None]
        image = str((task.get("data") or {}).get(data_key, ""))
        if not scores:
            missing.append(task["id"])
            continue
        found.append({"id": task["id"], "image": image, "group": group_of(image),
                      "uncertainty": float(scores[-1])})
    return found, missing


def labelled_boxes(tasks: list[dict[str, Any]]) -> dict[str, int]:
    """Boxes per label in the tasks' annotations (cancelled ones left out): how rare each
    class is in what the model learns from."""
    counts: Counter[str] = Counter()
    for task in tasks:
        for annotation in task.get("annotations") or []:
            if annotation.get("was_cancelled"):
                continue
            for region in annotation.get("result") or []:
                counts.update((region.get("value") or {}).get("rectanglelabels") or [])
    return dict(counts)


def embedded(ranking: Ranking, candidates: list[dict[str, Any]], media: MediaSettings,
             device: str) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """The candidates whose images could be read, with the ranking model's embeddings."""
    predictor = ModelDir.open(ranking.model_dir).predictor(device=device)
    load = TaskLoader(media)
    kept, vectors = [], []
    for candidate in candidates:
        try:
            image = load(Item(candidate["image"], candidate["id"]))
        except Exception as exc:  # its place goes to another: the batch is not held up
            print(f"select: task {candidate['id']} left out of the spread: {exc}")
            continue
        kept.append(candidate)
        vectors.append(predictor.embed(image))
    return kept, torch.stack(vectors) if vectors else torch.zeros(0, 1)


def _batch(found: list[dict[str, Any]], k: int, ranking: Ranking, sp: dict[str, Any],
           media: MediaSettings) -> list[dict[str, Any]]:
    """The top `k`, spread by folder or (`diversity: embeddings`) by the model's view."""
    if sp.get("diversity", "folders") == "folders":
        return spread(found, k)
    pool = sorted(found, key=lambda c: (-c["uncertainty"], c["id"]))
    pool = pool[: max(k, int(sp.get("pool_factor", 4)) * k)]
    kept, vectors = embedded(ranking, pool, media, sp.get("device", "auto"))
    return diverse(kept, vectors, k)


def _prelabel(project: int, ranking: Ranking, sp: dict[str, Any], report: Path,
              tasks: list[dict[str, Any]]) -> None:
    """Score the pool with the ranking model, run by its recipe, as `tridentloop prelabel`
    in its own process (pipelines never import the CLI). Unreadable images are reported
    (exit 1), not fatal."""
    rarity = (["--labelled-boxes", json.dumps(labelled_boxes(tasks))]
              if ranking.uncertainty == "rare-animals" else [])
    done = subprocess.run(
        [sys.executable, "-m", "backend.cli", "prelabel", "--project", str(project),
         *ranking.model, "--only-unlabeled", "--uncertainty", ranking.uncertainty, *rarity,
         "--device", sp.get("device", "auto"),
         "--report", str(report)],
        check=False,
    )
    if done.returncode not in (0, 1):
        fail(f"pre-labelling the unlabeled tasks failed (exit {done.returncode}); see above")


def main() -> None:
    params = load_params()
    sp = params.get("select", {})
    output = Path(sp.get("output", "data/select/next.json"))
    report = output.with_name("prelabel.report.json")
    url, api_key, project = label_studio_target(params, "select")
    from backend.labelstudio.label_config import parse_label_config

    client, opened = open_label_studio(url, api_key, project, "select", params)
    data_key = parse_label_config(opened.label_config).controls[0].data_key
    k = int(sp.get("k", 20))
    if sp.get("diversity", "folders") not in ("folders", "embeddings"):
        fail(f"select.diversity {sp['diversity']!r}: choose folders or embeddings")
    ranking = ranking_model(params)
    tasks = list_tasks(client, project)
    if ranking is None:
        batch, found, missing, version = spread_sample(tasks, k, data_key), [], [], None
        how = ("no model has been trained yet, so a spread sample: each folder in turn, a "
               "fixed pseudo-random order within it")
    else:
        version = ranking.version
        found, missing = candidates(tasks, version, data_key)
        if missing and sp.get("prelabel_missing", True):
            _prelabel(project, ranking, sp, report, tasks)
            found, missing = candidates(list_tasks(client, project), version, data_key)
        batch = _batch(found, k, ranking, sp, MediaSettings(label_studio_url=url, api_key=api_key))
        how = f"ranked by {ranking.what}, spread by {sp.get('diversity', 'folders')}"
    view = show_tasks(client, project, VIEW_TITLE, [c["id"] for c in batch],
                      ["-tasks:predictions_score"]) if (
        batch and sp.get("create_view", True)) else None
    write_json(output, {
        "model_version": version, "project": project, "view": view, "candidates": len(found),
        "without_prediction": missing, "tasks": batch,
    })
    print(f"select: {len(batch)} unlabeled task(s) chosen, {how}"
          + (f"; {len(missing)} without a prediction of {version} (see {report})"
             if missing else ""))


if __name__ == "__main__":
    main()
