"""DVC stage `export`: accepted annotations in Label Studio -> a COCO dataset on disk.

A task counts when its latest submitted annotation is not a skip (`was_cancelled`); with
`only_ground_truth`, only ground-truth annotations count (open-source Label Studio has no
review state). Images are downloaded through the same media layer as serving and stored
under content-addressed names; an image that cannot be fetched or decoded is reported in
the manifest and skipped. With nothing accepted, the stage fails with a clear message and
nothing downstream runs, so nothing is deployed.

Outputs: `<dir>/annotations.json` and `<dir>/images/` (DVC-tracked) and `<dir>/manifest.json`
(counts per class, the project, the snapshot time, what was skipped, and every region left
out of the dataset counted by why: unknown label, rotated box, other control or type).
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from backend.imagery.images import ImageError, load_image
from backend.serving.label_config import LabelConfigError, parse_label_config
from backend.serving.media import MediaError, MediaFetcher, MediaSettings

from .coco import content_name, write_json
from .params import fail, label_studio_target, load_params


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


def _as_dict(obj: Any) -> dict[str, Any]:
    return obj if isinstance(obj, dict) else obj.model_dump()


def main() -> None:
    params = load_params()
    ls_params = params.get("labelstudio", {})
    out = Path(params.get("dataset", {}).get("dir", "data/dataset"))
    url, api_key, project_id = label_studio_target(params, "export")
    from label_studio_sdk import LabelStudio

    client = LabelStudio(base_url=url, api_key=api_key)
    project = client.projects.get(id=project_id)
    try:
        control = parse_label_config(project.label_config).controls[0]
    except LabelConfigError as exc:
        fail(f"project {project_id}: {exc}")
    categories = {name: i for i, name in enumerate(control.labels)}
    media = MediaFetcher(MediaSettings(label_studio_url=url, api_key=api_key))
    only_gt = bool(ls_params.get("only_ground_truth", False))
    split_field = params.get("dataset", {}).get("split_field", "split")

    images_dir = out / "images"
    staging = out / ".images.incoming"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    coco: dict[str, Any] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i, "name": n} for n, i in categories.items()],
    }
    skipped: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    tasks = [_as_dict(t) for t in client.tasks.list(project=project_id, fields="all")]
    for task in tqdm(tasks, desc="export", unit="task"):
        annotation = latest_accepted([_as_dict(a) for a in task.get("annotations") or []], only_gt)
        if annotation is None:
            continue
        uri = (task.get("data") or {}).get(control.data_key)
        try:
            data = media.fetch(uri, task["id"])
            image = load_image(data, name=str(uri))
        except (MediaError, ImageError) as exc:
            skipped.append({"task": task["id"], "image": uri, "reason": str(exc)})
            print(f"warning: task {task['id']} skipped: {exc}")
            continue
        height, width = image.shape[:2]
        name = content_name(data, Path(str(uri).split("?")[0]).suffix.lower() or ".img")
        (staging / name).write_bytes(data)
        entry = {"id": task["id"], "file_name": name, "width": width, "height": height}
        pin = (task.get("data") or {}).get(split_field)
        if isinstance(pin, str) and pin.strip():
            entry["split"] = pin.strip().lower()  # `split` decides what it means
        coco["images"].append(entry)
        boxes, left_out = boxes_of(annotation, control.from_name, categories, width, height)
        dropped.update(left_out)
        for box in boxes:
            coco["annotations"].append(
                {
                    "image_id": task["id"],
                    "iscrowd": 0,
                    "area": round(box["bbox"][2] * box["bbox"][3], 3),
                    **box,
                }
            )
    if not coco["images"]:
        shutil.rmtree(staging, ignore_errors=True)
        fail(
            f"project {project_id} has no accepted annotations yet ({len(tasks)} tasks, "
            f"{len(skipped)} skipped): label some images in Label Studio first"
        )
    coco["images"].sort(key=lambda im: im["id"])
    for i, ann in enumerate(
        sorted(coco["annotations"], key=lambda a: (a["image_id"], a["bbox"])), start=1
    ):
        ann["id"] = i
    coco["annotations"].sort(key=lambda a: a["id"])
    shutil.rmtree(images_dir, ignore_errors=True)
    staging.replace(images_dir)
    write_json(out / "annotations.json", coco)
    counts = {name: 0 for name in categories}
    for ann in coco["annotations"]:
        counts[control.labels[ann["category_id"]]] += 1
    write_json(
        out / "manifest.json",
        {
            "project": project_id,
            "label_studio": url,
            "snapshot_time": time.time(),
            "images": len(coco["images"]),
            "boxes": len(coco["annotations"]),
            "boxes_per_class": counts,
            "skipped": skipped,
            "dropped_regions": dict(sorted(dropped.items())),
            "only_ground_truth": only_gt,
        },
    )
    print(
        f"exported {len(coco['images'])} images, {len(coco['annotations'])} boxes "
        f"{counts}; skipped {len(skipped)}"
    )
    for why, count in sorted(dropped.items()):
        print(f"warning: {count} region(s) left out of the dataset: {why}")


if __name__ == "__main__":
    main()
