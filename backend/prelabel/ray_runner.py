"""`tridentloop prelabel --ray ADDRESS`: the same job spread over a Ray cluster.

Ray Data streams the items through two stages: CPU tasks fetch and decode images, and a pool
of actors, one model replica per GPU (or `--ray-workers` CPU replicas), tile and run them
with the very engine of the single-process job (`detect_stream`), so each image gets the
same detections either way. Results come back to this process, which saves them as they
arrive. Ray retries the decode tasks of a worker that dies, and Ray Data restarts a lost
replica and redoes its batches, so a lost node costs time, not images. Every node needs
tridentloop installed, as on this machine.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import ray
import torch

from .. import uncertainty
from ..detection.device import run_settings
from ..detection.structures import Detections
from ..detection.tiling import TilingOptions
from ..model_dir import ModelDir
from .sources import Item
from .stream import ImageResult, detect_stream

_NO_IMAGE = np.zeros((0, 0, 3), np.uint8)  # Ray columns hold no None; "" is "no error"


class _Decode:
    """CPU stage: an item's image, or the reason it has none."""

    def __init__(self, load: Callable[[Item], np.ndarray], items: list[Item]) -> None:
        self.load, self.items = load, items

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        try:
            return {"index": row["index"], "image": self.load(self.items[row["index"]]),
                    "error": ""}
        except Exception as exc:  # reported per image, as in the single-process job
            return {"index": row["index"], "image": _NO_IMAGE, "error": str(exc) or repr(exc)}


class _Replica:
    """One model on one device, fed decoded images by Ray Data."""

    def __init__(self, model: str, overrides: dict[str, str], settings: dict[str, Any],
                 method: str, tiling: TilingOptions | None, threads: int | None) -> None:
        if threads:
            torch.set_num_threads(threads)
        predictor = ModelDir.open(model).predictor(overrides, **settings)
        self.predictors = [predictor, *uncertainty.counterparts(method, predictor)]
        self.tiling = tiling

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = list(zip(batch["index"].tolist(), batch["image"], batch["error"], strict=True))
        images = {i: image for i, image, error in rows if not error}
        results = [ImageResult(i, error=error) for i, _, error in rows if error]
        results += detect_stream(list(images), images.__getitem__, self.predictors,
                                 self.tiling, workers=1)
        out: dict[str, list] = {k: [] for k in ("index", "error", "height", "width", "crops",
                                                "detections")}
        for result in results:
            out["index"].append(result.item)
            out["error"].append(result.error or "")
            out["height"].append(result.height)
            out["width"].append(result.width)
            out["crops"].append(result.crops)
            out["detections"].append([_arrays(d) for d in result.detections])
        return out


def _arrays(det: Detections) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return det.boxes.numpy(), det.scores.numpy(), det.classes.numpy()


def _detections(arrays: Any, height: int, width: int) -> Detections:
    boxes, scores, classes = (torch.from_numpy(np.asarray(a)) for a in arrays)
    return Detections(boxes.reshape(-1, 4), scores, classes, (height, width))


def _connect(address: str, replicas: int) -> bool:
    """Join the cluster at `address`, or start a local one; True when we started it."""
    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(num_cpus=replicas + 2, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return True


def ray_detect_stream(
    args: argparse.Namespace,
    model: ModelDir,
    tiling: TilingOptions | None,
    load: Callable[[Item], np.ndarray],
    items: list[Item],
) -> Iterator[ImageResult[Item]]:
    started = _connect(args.ray, args.ray_workers or 1)
    gpus = int(ray.cluster_resources().get("GPU", 0)) if args.device != "cpu" else 0
    replicas = args.ray_workers or max(gpus, 1)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours shows images and tiles per second
    try:
        ds = ray.data.from_items([{"index": i} for i in range(len(items))])
        ds = ds.map(_Decode(load, items), num_cpus=0.5)
        ds = ds.map_batches(
            _Replica,
            fn_constructor_kwargs={
                "model": str(model.path.resolve()), "overrides": dict(args.opt),
                "settings": run_settings(args),
                "method": args.uncertainty, "tiling": tiling,
                # The driver's thread count: CPU replicas then compute exactly what it would.
                "threads": None if gpus else (args.threads or torch.get_num_threads()),
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=replicas),
            num_gpus=1 if gpus else 0,
            num_cpus=0 if gpus else 1,
            batch_format="numpy",
        )  # Ray Data restarts a lost replica and retries its batches (max_restarts=-1)
        for row in ds.iter_rows():
            item = items[int(row["index"])]
            if row["error"]:
                yield ImageResult(item, error=str(row["error"]))
                continue
            height, width = int(row["height"]), int(row["width"])
            yield ImageResult(
                item, [_detections(d, height, width) for d in row["detections"]],
                height, width, int(row["crops"]),
            )
    finally:
        if started:
            ray.shutdown()
