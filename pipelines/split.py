"""DVC stage `split`: train/val. A task pinned in Label Studio goes where it is pinned; every
other task goes by a hash of its id, so tasks added later never move old ones from one side
to the other.

A pin is a field of the task's data (`dataset.split_field`, default `split`) holding `val` or
`train`: a column in an imported CSV/JSON, shown and filterable in the Data Manager, editable
through the API. That keeps a holdout (one flight, one camera station) fixed however the
project grows, and it needs no Label Studio Enterprise feature (open source has no task
tags). Export carries the value into `annotations.json`; other values are reported and the
task is split by hash.

Pins do not switch the hash off: unpinned tasks still go to val at `split.val_percent`. To
validate on the pinned tasks alone (a holdout flight, nothing else), set `val_percent: 0`;
the stage says which rule it followed, and warns when val pins sit beside hashed val tasks.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

from .coco import read_coco, subset, write_json
from .params import fail, load_params

PINS = {"val": True, "train": False}


def is_val(task_id: int, val_percent: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < val_percent * 100


def assign(
    images: list[dict[str, Any]], val_percent: float, seed: int
) -> tuple[set[int], set[int], Counter[str]]:
    """(train ids, val ids, unknown pin values with their counts)."""
    val_ids, unknown = set(), Counter()
    for image in images:
        pin = image.get("split")
        if pin in PINS:
            chosen = PINS[pin]
        else:
            if pin:
                unknown[pin] += 1
            chosen = is_val(image["id"], val_percent, seed)
        if chosen:
            val_ids.add(image["id"])
    return {im["id"] for im in images} - val_ids, val_ids, unknown


def main() -> None:
    params = load_params()
    split = params.get("split", {})
    dataset = Path(params.get("dataset", {}).get("dir", "data/dataset"))
    out = Path(split.get("dir", "data/split"))
    coco = read_coco(dataset / "annotations.json")
    train_ids, val_ids, unknown = assign(
        coco["images"], float(split.get("val_percent", 20)), int(split.get("seed", 0))
    )
    for value, count in sorted(unknown.items()):
        print(f"warning: {count} task(s) pinned to {value!r}, which is neither 'val' nor "
              "'train': split by hash")
    if not train_ids or not val_ids:
        fail(
            f"{len(coco['images'])} labelled images give {len(train_ids)} train and "
            f"{len(val_ids)} val: label more images (or change split.val_percent or the pins)"
        )
    write_json(out / "train.json", subset(coco, train_ids))
    write_json(out / "val.json", subset(coco, val_ids))
    pinned_val = sum(im.get("split") == "val" for im in coco["images"])
    pinned = sum(im.get("split") in PINS for im in coco["images"])
    by_hash = len(val_ids) - pinned_val
    percent = float(split.get("val_percent", 20))
    print(f"split: {len(train_ids)} train, {len(val_ids)} val ({pinned_val} pinned to val, "
          f"{by_hash} by hash at val_percent {percent:g}; {pinned} task(s) pinned in all)")
    if pinned_val and by_hash:
        print(f"note: {by_hash} unpinned task(s) went to val by hash beside the {pinned_val} "
              "pinned there; to validate on the pinned tasks alone, set split.val_percent: 0")


if __name__ == "__main__":
    main()
