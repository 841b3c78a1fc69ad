"""DVC stage `select`: the next batch for annotators, the most informative images first.

Reads the project's unlabeled tasks and the uncertainty that `tridentloop prelabel` stored
as each task's prediction score (for the deployed model version), keeps the top `k`, and
spreads them across groups (the folder an image came from: a survey flight, a camera-trap
station) by taking groups in turn, each time its most uncertain image left, so one
confusing flight cannot fill the whole batch with near-duplicates. Tasks with no prediction
of the deployed version are counted and named in the output: pre-label them first.

Writes `data/select/next.json` and, with `create_view`, a Data Manager tab in Label Studio
filtered to the batch and sorted by uncertainty.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from backend.labelstudio.tasks import is_labeled, list_tasks
from backend.registry import Registry
from backend.uncertainty import DEFAULT as DEFAULT_UNCERTAINTY

from .coco import write_json
from .params import fail, label_studio_target, load_params

VIEW_TITLE = "tridentloop: label next"


def group_of(image: str) -> str:
    """The folder an image came from (uploads share one: `/data/upload/<project>`)."""
    path = image.split("?d=", 1)[-1].split("?", 1)[0]
    return path.rsplit("/", 1)[0] if "/" in path else ""


def spread(candidates: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Top `k` by uncertainty, taken from the groups in turn (most uncertain group first)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in sorted(candidates, key=lambda c: (-c["uncertainty"], c["id"])):
        groups[c["group"]].append(c)
    queues = sorted(groups.values(), key=lambda g: (-g[0]["uncertainty"], g[0]["id"]))
    chosen: list[dict[str, Any]] = []
    while len(chosen) < k and any(queues):
        for queue in queues:
            if queue and len(chosen) < k:
                chosen.append(queue.pop(0))
    return chosen


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


def show_in_label_studio(client: Any, project: int, ids: list[int]) -> int:
    """One Data Manager tab, updated in place on every run, filtered to the batch."""
    data = {
        "title": VIEW_TITLE,
        "filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:id", "operator": "in_list", "type": "Number", "value": ids}
        ]},
        "ordering": ["-tasks:predictions_score"],
    }
    existing = [v for v in client.views.list(project=project)
                if (v.data or {}).get("title") == VIEW_TITLE]
    if existing:
        return client.views.update(id=existing[0].id, project=project, data=data).id
    return client.views.create(project=project, data=data).id


def _prelabel(project: int, registry: str, sp: dict[str, Any], report: Path) -> None:
    """Score the pool with the deployed model, run by its recipe, as `tridentloop prelabel`
    in its own process (pipelines never import the CLI). Unreadable images are reported
    (exit 1), not fatal."""
    done = subprocess.run(
        [sys.executable, "-m", "backend.cli", "prelabel", "--project", str(project),
         "--registry", registry, "--only-unlabeled",
         "--uncertainty", sp.get("uncertainty", DEFAULT_UNCERTAINTY),
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
    version = Registry(params["deploy"]["registry"]).current_name()
    if version is None:  # the first models may not beat drawing: deploy keeps them back
        write_json(output, {"model_version": None, "project": project, "view": None,
                            "candidates": 0, "without_prediction": [], "tasks": []})
        print("select: no model is deployed yet, so there is nothing to rank by: label any "
              "images, and run dvc repro again")
        return
    from label_studio_sdk import LabelStudio

    from backend.labelstudio.label_config import parse_label_config

    client = LabelStudio(base_url=url, api_key=api_key)
    data_key = parse_label_config(client.projects.get(id=project).label_config).controls[0].data_key
    found, missing = candidates(list_tasks(client, project), version, data_key)
    if missing and sp.get("prelabel_missing", True):
        _prelabel(project, params["deploy"]["registry"], sp, report)
        found, missing = candidates(list_tasks(client, project), version, data_key)
    batch = spread(found, int(sp.get("k", 20)))
    view = show_in_label_studio(client, project, [c["id"] for c in batch]) if (
        batch and sp.get("create_view", True)) else None
    write_json(output, {
        "model_version": version, "project": project, "view": view, "candidates": len(found),
        "without_prediction": missing, "tasks": batch,
    })
    print(f"select: {len(batch)} of {len(found)} unlabeled tasks chosen (model {version}); "
          f"{len(missing)} without a prediction of {version}"
          + (f" (see {report})" if missing else ""))


if __name__ == "__main__":
    main()
