"""The batch job's engine: images stream in, detections stream out.

Three kinds of threads, so that the device never waits:
- CPU workers fetch and decode each image, cut it into the crops of its `TilePlan` and
  prepare them (channel order, resize, uint8 tensor, pinned where the device wants it); a
  JPEG the loader decodes on the device (`--decode device`) is cut there instead;
- one device thread runs batches of prepared crops. Crops of one shape share a batch
  whichever image they come from, so single-tile camera-trap photos run in full batches
  too; a batch is run when full, or at once when no crop is waiting (never held back);
- the caller's thread merges each image's crops and gets its result, then does whatever
  it does with it (uncertainty, sinks) while the device runs the next batches.
At most `workers` images plus bounded queues of crops and outputs are in memory at once,
however large the survey.

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
class _Crop:
    index: int  # the image's
    position: int  # in its plan's crops
    prepared: PreparedImage


@dataclass
class _Outputs:
    """Detections of some of one image's crops, per predictor."""

    index: int
    positions: list[int]
    detections: list[list[Detections]]


@dataclass
class _Failed(Generic[T]):
    index: int
    item: T | None  # None when the device thread reports it: the caller knows the item
    error: str


_DONE = object()


def detect_stream(
    items: Iterable[T],
    load: Callable[[T], np.ndarray],
    predictors: Sequence[Predictor],
    tiling: TilingOptions | None,
    workers: int = 4,
    batch_size: int | None = None,
    on_crops: Callable[[int], None] | None = None,
) -> Iterator[ImageResult[T]]:
    """Results in the order images finish (each carries its item). An image that cannot be
    loaded or run comes back with `error` set; the stream goes on. `on_crops(n)` hears, in
    the caller's thread, of every n crops run: an orthomosaic of thousands of tiles is one
    image, and its progress is in tiles. Closing the iterator (Ctrl-C, `break`) stops the
    threads."""
    size = batch_size or (tiling.batch_size if tiling else None) or predictors[0].preferred_batch
    crops: queue.Queue = queue.Queue(maxsize=4 * size + 2 * workers)
    outputs: queue.Queue = queue.Queue(maxsize=4 * size + 2 * workers)
    stop = threading.Event()
    source = _Numbered(items)
    decoders = [
        threading.Thread(
            target=_decode,
            args=(source, load, predictors[0], tiling, crops, stop),
            name=f"prelabel-decode-{i}",
            daemon=True,
        )
        for i in range(workers)
    ]
    device = threading.Thread(
        target=_DeviceLoop(predictors, size, crops, outputs, stop, workers).run,
        name="prelabel-device",
        daemon=True,
    )
    for thread in (*decoders, device):
        thread.start()
    pending: dict[int, tuple[_Planned, list[list[Detections | None]], int]] = {}
    try:
        while (message := outputs.get()) is not _DONE:
            if on_crops is not None and isinstance(message, _Outputs):
                on_crops(len(message.positions))
            result = _collect(message, pending, len(predictors))
            if result is not None:
                yield result
    finally:
        stop.set()
        for q, threads in ((outputs, [device]), (crops, decoders)):
            while any(t.is_alive() for t in threads):  # unblock threads on a full queue
                with contextlib.suppress(queue.Empty):
                    q.get(timeout=0.1)


def _collect(
    message: _Planned | _Outputs | _Failed,
    pending: dict[int, tuple[_Planned, list[list[Detections | None]], int]],
    num_predictors: int,
) -> ImageResult | None:
    """Fold one message into the per-image state; an image's result once it is complete."""
    if isinstance(message, _Planned):
        slots = [[None] * len(message.plan.crops) for _ in range(num_predictors)]
        pending[message.index] = (message, slots, 0)
        return None
    if isinstance(message, _Failed):
        planned = pending.pop(message.index, None)
        item = message.item if message.item is not None else planned.item if planned else None
        return ImageResult(item, error=message.error)
    if message.index not in pending:  # the image already failed
        return None
    planned, slots, done = pending[message.index]
    for per_predictor, found in zip(slots, message.detections, strict=True):
        for position, det in zip(message.positions, found, strict=True):
            per_predictor[position] = det
    done += len(message.positions)
    plan = planned.plan
    if done < len(plan.crops):
        pending[message.index] = (planned, slots, done)
        return None
    del pending[message.index]
    merged = [plan.merge(list(per_predictor)) for per_predictor in slots]
    return ImageResult(planned.item, merged, plan.height, plan.width, len(plan.crops))


class _DeviceLoop:
    """The one thread that runs the model: gathers crops into same-shape batches across
    images and passes their detections on, in the order the caller needs them."""

    def __init__(
        self,
        predictors: Sequence[Predictor],
        size: int,
        crops: queue.Queue,
        outputs: queue.Queue,
        stop: threading.Event,
        workers: int,
    ) -> None:
        self.predictors = predictors
        self.size = size
        self.crops = crops
        self.outputs = outputs
        self.stop = stop
        self.running = workers
        self.buckets: dict[tuple[int, int], list[_Crop]] = {}
        self.failed: set[int] = set()

    def run(self) -> None:
        try:
            while self.running and not self.stop.is_set():
                self._take(self.crops.get())
                while self.running and not self.stop.is_set():
                    try:
                        self._take(self.crops.get_nowait())
                    except queue.Empty:
                        break
                self._run_fullest()  # nothing else waiting: run what there is
            while self.buckets and not self.stop.is_set():
                self._run_fullest()
        finally:
            self.outputs.put(_DONE)

    def _take(self, message: object) -> None:
        if message is _DONE:
            self.running -= 1
        elif isinstance(message, _Crop):
            if message.index not in self.failed:
                bucket = self.buckets.setdefault(message.prepared.shape, [])
                bucket.append(message)
                if len(bucket) == self.size:
                    self._run(self.buckets.pop(message.prepared.shape))
        else:  # _Planned and _Failed go on in order, ahead of the image's outputs
            if isinstance(message, _Failed):
                self._forget(message.index)
            self.outputs.put(message)

    def _forget(self, index: int) -> None:
        """An image that failed: its crops still waiting are dropped, later ones ignored."""
        self.failed.add(index)
        for shape in list(self.buckets):
            self.buckets[shape] = [c for c in self.buckets[shape] if c.index != index]
            if not self.buckets[shape]:
                del self.buckets[shape]

    def _run_fullest(self) -> None:
        if self.buckets:
            shape = max(self.buckets, key=lambda s: len(self.buckets[s]))
            self._run(self.buckets.pop(shape))

    def _run(self, batch: list[_Crop]) -> None:
        prepared = [c.prepared for c in batch]
        try:
            found = [p.predict_prepared(prepared) for p in self.predictors]
        except Exception as exc:  # one bad batch (out of memory, say) must not end the survey
            log.exception("prelabel: inference failed for a batch of %d crop(s)", len(batch))
            for index in dict.fromkeys(c.index for c in batch):
                self._forget(index)
                self.outputs.put(_Failed(index, None, f"inference failed: {exc}"))
            return
        by_image: dict[int, list[int]] = {}
        for row, c in enumerate(batch):
            by_image.setdefault(c.index, []).append(row)
        for index, rows in by_image.items():
            self.outputs.put(
                _Outputs(
                    index,
                    [batch[r].position for r in rows],
                    [[per_predictor[r] for r in rows] for per_predictor in found],
                )
            )


class _Numbered(Generic[T]):
    """A thread-safe, numbered view of the items, read lazily as workers ask for more."""

    def __init__(self, items: Iterable[T]) -> None:
        self._items = zip(itertools.count(), items)
        self._lock = threading.Lock()

    def next(self) -> tuple[int, T] | None:
        with self._lock:
            return next(self._items, None)


def _decode(
    source: _Numbered,
    load: Callable,
    predictor: Predictor,
    tiling: TilingOptions | None,
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
                for position, tile in enumerate(plan.crops):
                    if stop.is_set():
                        return
                    out.put(_Crop(index, position, predictor.prepare(crop(image, tile))))
            except Exception as exc:  # reported per image, never fatal to the run
                out.put(_Failed(index, item, str(exc) or type(exc).__name__))
    finally:
        out.put(_DONE)
