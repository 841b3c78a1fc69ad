"""DVC stage `split`: train/val by a hash of the task id, so that tasks added later never
move old tasks from one side to the other."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .coco import read_coco, subset, write_json
from .params import fail, load_params


def is_val(task_id: int, val_percent: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < val_percent * 100


def main() -> None:
    params = load_params()
    split = params.get("split", {})
    dataset = Path(params.get("dataset", {}).get("dir", "data/dataset"))
    out = Path(split.get("dir", "data/split"))
    coco = read_coco(dataset / "annotations.json")
    val_ids = {
        im["id"]
        for im in coco["images"]
        if is_val(im["id"], float(split.get("val_percent", 20)), int(split.get("seed", 0)))
    }
    train_ids = {im["id"] for im in coco["images"]} - val_ids
    if not train_ids or not val_ids:
        fail(
            f"{len(coco['images'])} labelled images give {len(train_ids)} train and "
            f"{len(val_ids)} val: label more images (or change split.val_percent)"
        )
    write_json(out / "train.json", subset(coco, train_ids))
    write_json(out / "val.json", subset(coco, val_ids))
    print(f"split: {len(train_ids)} train, {len(val_ids)} val")


if __name__ == "__main__":
    main()
