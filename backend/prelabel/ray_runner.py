"""`tridentloop prelabel --ray ADDRESS`: the same job spread over a Ray cluster.

Ray Data streams the items to a pool of actors, one model replica per GPU (or `--ray-workers`
CPU replicas, spread over the nodes), which tile and run them with the very engine of the
single-process job (`detect_stream`), so each image gets the same detections either way.
GPU replicas are fed by CPU tasks that fetch and decode; CPU replicas decode their own
images, so no replica, restarted after a node is lost, can take the CPU decoding waits for.
Results come back to this process, which saves them as they arrive. Ray Data restarts a
lost replica and redoes its batches, so a lost node costs time, not images. Every node
needs tridentloop installed, as on this machine.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
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
DECODE_CPUS = 0.5  # what one decode task (feeding GPU replicas) reserves
STALL_S = 120.0  # no image finished for this long: say what the job waits for
log = logging.getLogger(__name__)


class _Decode:
    """An item's image, or the reason it has none."""

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
                 method: str, tiling: TilingOptions | None, threads: int | None,
                 decode: _Decode | None) -> None:
        if threads:
            torch.set_num_threads(threads)
        predictor = ModelDir.open(model).predictor(overrides, **settings)
        self.predictors = [predictor, *uncertainty.counterparts(method, predictor)]
        self.tiling, self.decode = tiling, decode

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        indices = batch["index"].tolist()
        if self.decode is not None:  # a CPU replica: its own decoding
            rows = [(d["index"], d["image"], d["error"])
                    for d in (self.decode({"index": i}) for i in indices)]
        else:
            rows = list(zip(indices, batch["image"], batch["error"], strict=True))
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
    """Join the cluster at `address`, or start a local one of our own (`address="local"`:
    never the cluster `ray start` may already run on this machine); True when we started
    it."""
    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(address="local", num_cpus=replicas + 2, include_dashboard=False,
                 log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return True


def check_room(replicas: int, gpus: int, cpus: float) -> None:
    """Refuse more CPU replicas than the cluster has CPUs (each holds one for the job's
    length: the rest would wait forever), or GPU replicas that leave their decode tasks no
    CPU."""
    if gpus:
        if cpus < DECODE_CPUS:
            raise ValueError(f"a cluster of {cpus:g} CPUs leaves the decode tasks feeding the "
                             f"GPU replicas no CPU (each needs {DECODE_CPUS:g}): add a node "
                             "with CPUs")
        return
    if cpus >= replicas:
        return
    advice = f"use --ray-workers {int(cpus)} or add CPUs" if cpus >= 1 else "add CPUs"
    raise ValueError(f"--ray-workers {replicas} on a cluster of {cpus:g} CPUs: each CPU "
                     f"replica holds 1 CPU, the rest would wait forever; {advice}")


class Watchdog:
    """Says, every `stall_s` without a finished image, what the job waits for: a lost node
    or a cluster too small must not look like a job that works."""

    def __init__(self, describe: Callable[[], str], stall_s: float = STALL_S) -> None:
        self.describe, self.stall_s = describe, stall_s
        self.last = time.monotonic()
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="ray-watchdog").start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(self.stall_s, 10.0)):
            idle = time.monotonic() - self.last
            if idle >= self.stall_s:
                log.warning("prelabel --ray: no image finished for %.0f s; %s", idle,
                            self.describe())
                self.last = time.monotonic()


def _waiting_for() -> str:
    free, total = ray.available_resources(), ray.cluster_resources()
    return (f"the cluster has {free.get('CPU', 0):g} of {total.get('CPU', 0):g} CPUs and "
            f"{free.get('GPU', 0):g} of {total.get('GPU', 0):g} GPUs free (a lost node whose "
            "replica has nowhere to restart? `ray status`)")


def ray_detect_stream(
    args: argparse.Namespace,
    model: ModelDir,
    tiling: TilingOptions | None,
    load: Callable[[Item], np.ndarray],
    items: list[Item],
) -> Iterator[ImageResult[Item]]:
    started = _connect(args.ray, args.ray_workers or 1)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if args.device != "cpu" else 0
    replicas = args.ray_workers or max(gpus, 1)
    watchdog = None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours shows images and tiles per second
    try:
        check_room(replicas, gpus, resources.get("CPU", 0))
        ds = ray.data.from_items([{"index": i} for i in range(len(items))])
        if gpus:
            ds = ds.map(_Decode(load, items), num_cpus=DECODE_CPUS)
        ds = ds.map_batches(
            _Replica,
            fn_constructor_kwargs={
                "model": str(model.path.resolve()), "overrides": dict(args.opt),
                "settings": run_settings(args),
                "method": args.uncertainty, "tiling": tiling,
                # The driver's thread count: CPU replicas then compute exactly what it would.
                "threads": None if gpus else (args.threads or torch.get_num_threads()),
                "decode": None if gpus else _Decode(load, items),
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=replicas),
            num_gpus=1 if gpus else 0,
            num_cpus=0 if gpus else 1,
            batch_format="numpy",
        )  # Ray Data spreads the replicas over the nodes (its default), restarts a lost one
        # and retries its batches (max_restarts=-1)
        watchdog = Watchdog(_waiting_for)
        for row in ds.iter_rows():
            watchdog.beat()
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
        if watchdog is not None:
            watchdog.stop()
        if started:
            ray.shutdown()
