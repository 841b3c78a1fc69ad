"""DVC stage `export`: accepted annotations in Label Studio -> a COCO dataset on disk.

A task counts when its latest submitted annotation is not a skip (`was_cancelled`); with
`only_ground_truth`, only ground-truth annotations count (open-source Label Studio has no
review state). Images are downloaded through the same media layer as serving and stored
under content-addressed names; an image that cannot be fetched or decoded is reported in
the manifest and skipped. With nothing accepted, the stage fails with a clear message and
nothing downstream runs, so nothing is deployed.

Incremental: Label Studio moves a task's `updated_at` whenever one of its annotations is
created, updated or deleted, so a run lists only the tasks updated since the newest time
stamp the last run saw (less a ten-second overlap), reads those that changed, and counts the
project's annotated tasks; the rest come from `tasks.index.json` (their data and
annotations as last read). When that count differs from the cache's (a task was deleted),
one cheap listing of every task's id and time stamp says which are gone. A first run, or
one where more than 200 tasks changed, reads all annotated tasks through one export
snapshot instead. An image is fetched only for a task that is new or whose image URI
changed (`images.index.json` keeps task -> URI, file, size between runs; DVC leaves both
indexes in place with `persist`). Label Studio gives an uploaded file a new URI; an image
replaced in a bucket under the same key is seen with `dataset.refetch_images: true` (which
also reads every task again). Images no task uses any more are removed once the new
dataset is complete.

Outputs: `<dir>/annotations.json` and `<dir>/images/` (DVC-tracked) and `<dir>/manifest.json`
(counts per class, the project, when the dataset last changed, images fetched and reused
with the bytes downloaded, what was skipped, and every region left out of the dataset
counted by why: unknown label, rotated box, other control or type). A run that changes
nothing leaves the manifest as it was, so a no-op `dvc repro` leaves `git status` clean.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from backend.files import write_atomically
from backend.imagery.images import ImageError, load_image
from backend.labelstudio.connect import LabelStudioError
from backend.labelstudio.label_config import LabelConfigError, parse_label_config
from backend.labelstudio.retry import OutageError
from backend.labelstudio.sync import TaskStore
from backend.media.fetch import MediaError, MediaFetcher, MediaSettings

from .coco import content_name, write_json
from .params import fail, label_studio_target, load_params, open_label_studio


def latest_accepted(
    annotations: list[dict[str, Any]], only_ground_truth: bool
) -> dict[str, Any] | None:
    """The task's most recent submitted annotation, unless it is a skip."""
    submitted = [a for a in annotations if not only_ground_truth or a.get("ground_truth")]
    if not submitted:
        return None
    latest = max(
        submitted,
        key=lambda a: (a.get("updated_at") or a.get("created_at") or "", a.get("id") or 0),
    )
    return None if latest.get("was_cancelled") else latest


def boxes_of(
    annotation: dict[str, Any], from_name: str, categories: dict[str, int], width: int, height: int
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """COCO boxes (pixels) from the annotation's rectangles of one control, and every region
    left out, counted by why: a dataset must not lose labels without a word."""
    boxes = []
    dropped: Counter[str] = Counter()
    for region in annotation.get("result") or []:
        why = _unusable(region, from_name, categories)
        if why:
            dropped[why] += 1
            continue
        value = region["value"]
        x, y = value["x"] / 100 * width, value["y"] / 100 * height
        w, h = value["width"] / 100 * width, value["height"] / 100 * height
        if w <= 0 or h <= 0:
            dropped["empty box"] += 1
            continue
        boxes.append(
            {
                "bbox": [round(x, 3), round(y, 3), round(w, 3), round(h, 3)],
                "category_id": categories[value["rectanglelabels"][0]],
            }
        )
    return boxes, dropped


def _unusable(region: dict[str, Any], from_name: str, categories: dict[str, int]) -> str | None:
    """Why a region cannot become a training box, or None if it can."""
    if region.get("type") != "rectanglelabels":
        return f"not a rectangle ({region.get('type')})"
    if region.get("from_name") != from_name:
        return f"other control ({region.get('from_name')})"
    value = region.get("value") or {}
    label = (value.get("rectanglelabels") or [None])[0]
    if label not in categories:
        return f"label not in the config ({label})"
    if value.get("rotation", 0):
        return "rotated box"
    return None


class ImageStore:
    """The dataset's images by content, and which task's URI each came from, kept between
    runs so that only new or changed images cross the network."""

    def __init__(self, images: Path, media: MediaFetcher, refetch: bool) -> None:
        self.dir = images
        self.index_path = images.with_name(images.name + ".index.json")
        self.media = media
        self.index: dict[str, dict[str, Any]] = {}
        if self.index_path.is_file() and not refetch:
            self.index = json.loads(self.index_path.read_text())
        self.dir.mkdir(parents=True, exist_ok=True)
        self.kept: dict[str, dict[str, Any]] = {}
        self.fetched = self.reused = self.fetched_bytes = 0

    def get(self, task_id: int, uri: Any) -> dict[str, Any]:
        """{file, width, height} of the task's image; fetched and checked only when new."""
        known = self.index.get(str(task_id))
        if known and known["uri"] == uri and (self.dir / known["file"]).is_file():
            self.reused += 1
        else:
            data = self.media.fetch(uri, task_id)
            height, width = load_image(data, name=str(uri)).shape[:2]
            name = content_name(data, Path(str(uri).split("?")[0]).suffix.lower() or ".img")
            if not (self.dir / name).is_file():
                write_atomically(self.dir / name, data)
            known = {"uri": uri, "file": name, "width": width, "height": height}
            self.fetched += 1
            self.fetched_bytes += len(data)
        self.kept[str(task_id)] = known
        return known

    def commit(self) -> None:
        """The index of this run's tasks; images no task uses any more removed."""
        used = {entry["file"] for entry in self.kept.values()}
        for path in self.dir.iterdir():
            if path.name not in used:
                path.unlink()
        write_json(self.index_path, dict(sorted(self.kept.items(), key=lambda kv: int(kv[0]))),
                   compact=True)


def export_project(
    client: Any, project: Any, out: Path, media: MediaFetcher, only_gt: bool = False,
    split_field: str = "split", refetch: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(COCO annotations, manifest) of a project's accepted tasks (`project`: as
    `open_label_studio` found it), their images stored in `out/images` (fetched only when
    new or changed); fails when nothing is accepted yet."""
    project_id = int(project.id)
    try:
        control = parse_label_config(project.label_config).controls[0]
    except LabelConfigError as exc:
        fail(f"project {project_id}: {exc}")
    store = ImageStore(out / "images", media, refetch)
    known = TaskStore(out / "tasks.index.json", refetch)
    dataset = _Dataset(control, split_field)
    try:
        tasks = known.sync(client, project_id)
    except (LabelStudioError, OutageError) as exc:
        fail(str(exc))
    for task in tqdm(tasks, desc="export", unit="task"):
        annotation = latest_accepted(task.get("annotations") or [], only_gt)
        if annotation is not None:
            dataset.add(task, annotation, store)
    if not dataset.coco["images"]:
        fail(
            f"project {project_id} has no accepted annotations yet ({len(tasks)} tasks, "
            f"{len(dataset.skipped)} skipped): label some images in Label Studio first"
        )
    coco = dataset.finished()
    store.commit()
    known.commit()
    manifest = {
        "project": project_id,
        "images": len(coco["images"]),
        "boxes": len(coco["annotations"]),
        "boxes_per_class": dataset.counts(),
        "tasks_read": known.read,
        "tasks_unchanged": known.kept,
        "tasks_gone": known.removed,
        "tasks_listed": known.listing,
        "images_fetched": store.fetched,
        "images_reused": store.reused,
        "fetched_bytes": store.fetched_bytes,
        "skipped": dataset.skipped,
        "dropped_regions": dict(sorted(dataset.dropped.items())),
        "only_ground_truth": only_gt,
    }
    print(
        f"exported {manifest['images']} images, {manifest['boxes']} boxes "
        f"{manifest['boxes_per_class']}; skipped {len(dataset.skipped)}; read {known.read} "
        f"new or changed task(s), {known.kept} unchanged, {known.removed} gone; fetched "
        f"{store.fetched} new or changed image(s) ({store.fetched_bytes / 1e6:.1f} MB), "
        f"reused {store.reused}"
    )
    for why, count in sorted(dataset.dropped.items()):
        print(f"warning: {count} region(s) left out of the dataset: {why}")
    return coco, manifest


class _Dataset:
    """The COCO dataset of the accepted tasks, one task at a time, with what was skipped
    (images that cannot be used) and every region left out, counted by why."""

    def __init__(self, control: Any, split_field: str) -> None:
        self.control, self.split_field = control, split_field
        self.categories = {name: i for i, name in enumerate(control.labels)}
        self.coco: dict[str, Any] = {
            "images": [], "annotations": [],
            "categories": [{"id": i, "name": n} for n, i in self.categories.items()],
        }
        self.skipped: list[dict[str, Any]] = []
        self.dropped: Counter[str] = Counter()

    def add(self, task: dict[str, Any], annotation: dict[str, Any], store: ImageStore) -> None:
        uri = (task.get("data") or {}).get(self.control.data_key)
        try:
            image = store.get(task["id"], uri)
        except (MediaError, ImageError) as exc:
            self.skipped.append({"task": task["id"], "image": uri, "reason": str(exc)})
            print(f"warning: task {task['id']} skipped: {exc}")
            return
        width, height = image["width"], image["height"]
        entry = {"id": task["id"], "file_name": image["file"], "width": width, "height": height}
        pin = (task.get("data") or {}).get(self.split_field)
        if isinstance(pin, str) and pin.strip():
            entry["split"] = pin.strip().lower()  # `split` decides what it means
        self.coco["images"].append(entry)
        boxes, left_out = boxes_of(annotation, self.control.from_name, self.categories,
                                   width, height)
        self.dropped.update(left_out)
        self.coco["annotations"] += [
            {"image_id": task["id"], "iscrowd": 0,
             "area": round(box["bbox"][2] * box["bbox"][3], 3), **box} for box in boxes]

    def finished(self) -> dict[str, Any]:
        """The dataset in a stable order: images by task id, annotations numbered by
        (image, box), so an unchanged dataset hashes the same."""
        coco = self.coco
        coco["images"].sort(key=lambda im: im["id"])
        ordered = sorted(coco["annotations"], key=lambda a: (a["image_id"], a["bbox"]))
        for i, ann in enumerate(ordered, start=1):
            ann["id"] = i
        coco["annotations"] = ordered
        return coco

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.categories, 0)
        for ann in self.coco["annotations"]:
            counts[self.control.labels[ann["category_id"]]] += 1
        return counts


def main() -> None:
    params = load_params()
    ls_params = params.get("labelstudio", {})
    dataset = params.get("dataset", {})
    out = Path(dataset.get("dir", "data/dataset"))
    url, api_key, project_id = label_studio_target(params, "export")
    client, project = open_label_studio(url, api_key, project_id, "export", params)
    coco, manifest = export_project(
        client, project, out,
        MediaFetcher(MediaSettings(label_studio_url=url, api_key=api_key)),
        bool(ls_params.get("only_ground_truth", False)), dataset.get("split_field", "split"),
        bool(dataset.get("refetch_images", False)),
    )
    write_json(out / "annotations.json", coco)
    write_json(out / "manifest.json", dated({**manifest, "label_studio": url},
                                            out / "manifest.json"))


def dated(manifest: dict[str, Any], previous: Path) -> dict[str, Any]:
    """The manifest with `snapshot_time` now, or the previous manifest's when nothing else
    differs: the time says when the dataset last changed, and a run that changed nothing
    must not give git a file to commit."""
    try:
        before = json.loads(previous.read_text())
    except (OSError, ValueError):
        before = {}
    same = {**before, "snapshot_time": None} == {**manifest, "snapshot_time": None}
    return {**manifest, "snapshot_time": before["snapshot_time"] if same else time.time()}


if __name__ == "__main__":
    main()
