"""One worker thread owns the device; requests hand it images through a bounded queue.

Images that run in one pass are prepared (resized, uint8 tensor, pinned where the device
wants it) in the request's own thread, and those of one network input shape are batched
across requests into a single forward pass: two camera-trap photos of slightly different
sizes that resize to the same input share it. Larger images go through tiled inference,
their tiles batched together. A full queue refuses new work at once (the server answers
503) instead of letting memory grow.

Interactive requests (an annotator waiting on a smart tool) take a priority lane: the
worker always takes their images before any batch pre-annotation image still queued, so
one waits at most for the batch already on the device.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from ..detection.predictor import Predictor, PreparedImage
from ..detection.structures import Detections
from ..detection.tiling import TilePlan, TilingOptions

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More images are waiting than the queue allows."""


@dataclass
class _Job:
    predictor: Predictor
    image: np.ndarray | None  # a tiled image; None once prepared for one pass
    tiling: TilingOptions | None
    prepared: PreparedImage | None = None
    future: Future = field(default_factory=Future)


URGENT, NORMAL, STOP = 0, 1, 2  # queue priorities: interactive, batch, the close sentinel


class InferenceQueue:
    def __init__(self, max_pending: int = 256, max_batch: int = 8) -> None:
        self.max_batch = max_batch
        self._queue: queue.PriorityQueue[tuple[int, int, _Job | None]] = queue.PriorityQueue(
            maxsize=max_pending)
        self._order = itertools.count()  # first come, first served within a lane
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    def submit(
        self, predictor: Predictor, image: np.ndarray, tiling: TilingOptions | None,
        urgent: bool = False,
    ) -> Future:
        if self._queue.full():  # refuse before spending a resize on it
            raise QueueFull(f"inference queue is full ({self._queue.maxsize} images)")
        if TilePlan.for_image(*image.shape[:2], tiling).single_pass:
            job = _Job(predictor, None, tiling, predictor.prepare(image))
        else:
            job = _Job(predictor, image, tiling)
        try:
            self._queue.put_nowait((URGENT if urgent else NORMAL, next(self._order), job))
        except queue.Full as exc:
            raise QueueFull(f"inference queue is full ({self._queue.maxsize} images)") from exc
        return job.future

    def pending(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        self._queue.put((STOP, next(self._order), None))
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first, _, job = self._queue.get()
            if job is None:
                return
            batch = [job]
            while len(batch) < self.max_batch:  # one lane per batch: urgent work runs alone
                try:
                    lane, order, extra = self._queue.get_nowait()
                except queue.Empty:
                    break
                if extra is None or lane != first:
                    self._queue.put((lane, order, extra))  # for the next batch
                    break
                batch.append(extra)
            self._process(batch)

    def _process(self, batch: list[_Job]) -> None:
        # A request that gave up (its deadline passed) cancelled its job: skip it. A job
        # marked running can no longer be cancelled, so its result can always be set.
        batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
        groups: dict[tuple, list[_Job]] = {}
        for job in batch:
            if job.prepared is not None:
                groups.setdefault((id(job.predictor), job.prepared.shape), []).append(job)
            else:
                self._settle([job], lambda j=job: [j.predictor.detect(j.image, j.tiling)])
        for jobs in groups.values():
            size = jobs[0].predictor.preferred_batch
            for start in range(0, len(jobs), size):
                chunk = jobs[start : start + size]
                self._settle(
                    chunk,
                    lambda c=chunk: c[0].predictor.predict_prepared([j.prepared for j in c]),
                )

    @staticmethod
    def _settle(jobs: list[_Job], run: Callable[[], list[Detections]]) -> None:
        try:
            results = run()
        except Exception as exc:  # the worker must survive any bad input
            log.exception("inference failed for %d image(s)", len(jobs))
            for job in jobs:
                job.future.set_exception(exc)
            return
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)
