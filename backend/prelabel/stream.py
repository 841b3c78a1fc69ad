"""The batch job's engine: images stream in, detections stream out.

CPU worker threads fetch and decode each image, cut it into the crops of its `TilePlan` and
prepare them (channel order, resize, float tensor); the calling thread only runs batches of
prepared crops on the device and merges each image's detections. So the GPU never waits for
a JPEG decoder, and at most `workers` images plus a bounded queue of prepared batches are in
memory at once, however large the survey.

Every predictor given sees the same prepared crops (the first is the served model; the others
are uncertainty counterparts sharing its preprocessing).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from ..detection.predictor import Predictor, PreparedImage
from ..detection.structures import Detections
from ..detection.tiling import TilePlan, TilingOptions, crop

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class ImageResult(Generic[T]):
    item: T
    detections: list[Detections] = field(default_factory=list)  # one per predictor
    height: int = 0
    width: int = 0
    crops: int = 0
    error: str | None = None


@dataclass
class _Planned(Generic[T]):
    index: int
    item: T
    plan: TilePlan


@dataclass
class _Crops:
    index: int
    prepared: list[PreparedImage]


@dataclass
class _Failed(Generic[T]):
    index: int
    item: T
    error: str


_DONE = object()


def detect_stream(
    items: Iterable[T],
    load: Callable[[T], np.ndarray],
    predictors: Sequence[Predictor],
    tiling: TilingOptions | None,
    workers: int = 4,
    batch_size: int | None = None,
) -> Iterator[ImageResult[T]]:
    """Results in the order images finish (each carries its item). An image that cannot be
    loaded or run comes back with `error` set; the stream goes on. Closing the iterator
    (Ctrl-C, `break`) stops the workers."""
    size = batch_size or (tiling.batch_size if tiling else None) or predictors[0].preferred_batch
    out: queue.Queue = queue.Queue(maxsize=2 * workers + 2)
    stop = threading.Event()
    source = _Numbered(items)
    threads = [
        threading.Thread(
            target=_work,
            args=(source, load, predictors[0], tiling, size, out, stop),
            name=f"prelabel-decode-{i}",
            daemon=True,
        )
        for i in range(workers)
    ]
    for thread in threads:
        thread.start()
    pending: dict[int, tuple[_Planned, list[list[Detections]]]] = {}
    running = workers
    try:
        while running:
            message = out.get()
            if message is _DONE:
                running -= 1
            elif isinstance(message, _Failed):
                pending.pop(message.index, None)
                yield ImageResult(message.item, error=message.error)
            elif isinstance(message, _Planned):
                pending[message.index] = (message, [[] for _ in predictors])
            else:
                finished = _run_crops(message, pending, predictors)
                if finished is not None:
                    yield finished
    finally:
        stop.set()
        while any(t.is_alive() for t in threads):  # unblock workers waiting on a full queue
            with contextlib.suppress(queue.Empty):
                out.get(timeout=0.1)


def _run_crops(
    message: _Crops,
    pending: dict[int, tuple[_Planned, list[list[Detections]]]],
    predictors: Sequence[Predictor],
) -> ImageResult | None:
    """Run one batch of an image's crops; the image's result once its last batch is done."""
    if message.index not in pending:  # the image already failed
        return None
    planned, outputs = pending[message.index]
    try:
        for predictor, done in zip(predictors, outputs, strict=True):
            done += predictor.predict_prepared(message.prepared)
    except Exception as exc:  # one bad image (out of memory, say) must not end the survey
        log.exception("prelabel: inference failed for %s", planned.item)
        del pending[message.index]
        return ImageResult(planned.item, error=f"inference failed: {exc}")
    plan = planned.plan
    if len(outputs[0]) < len(plan.crops):
        return None
    del pending[message.index]
    return ImageResult(
        planned.item,
        [plan.merge(done) for done in outputs],
        plan.height,
        plan.width,
        len(plan.crops),
    )


class _Numbered(Generic[T]):
    """A thread-safe, numbered view of the items, read lazily as workers ask for more."""

    def __init__(self, items: Iterable[T]) -> None:
        self._items = zip(itertools.count(), items)
        self._lock = threading.Lock()

    def next(self) -> tuple[int, T] | None:
        with self._lock:
            return next(self._items, None)


def _work(
    source: _Numbered,
    load: Callable,
    predictor: Predictor,
    tiling: TilingOptions | None,
    size: int,
    out: queue.Queue,
    stop: threading.Event,
) -> None:
    try:
        while not stop.is_set() and (numbered := source.next()) is not None:
            index, item = numbered
            try:
                image = load(item)
                plan = TilePlan.for_image(*image.shape[:2], tiling)
                out.put(_Planned(index, item, plan))
                for batch in plan.batches(size):
                    if stop.is_set():
                        return
                    out.put(_Crops(index, [predictor.prepare(crop(image, t)) for t in batch]))
            except Exception as exc:  # reported per image, never fatal to the run
                out.put(_Failed(index, item, str(exc) or type(exc).__name__))
    finally:
        out.put(_DONE)
