"""One worker thread owns the device; requests hand it images through a bounded queue.

Images that fit in one tile and share a shape are batched across requests into a single
forward pass; larger images go through tiled inference. A full queue refuses new work at
once (the server answers 503) instead of letting memory grow.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from .predictor import Predictor
from .structures import Detections
from .tiling import TilePlan, TilingOptions

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More images are waiting than the queue allows."""


@dataclass
class _Job:
    predictor: Predictor
    image: np.ndarray
    tiling: TilingOptions | None
    future: Future = field(default_factory=Future)

    def single_pass(self) -> bool:
        return TilePlan.for_image(*self.image.shape[:2], self.tiling).single_pass


class InferenceQueue:
    def __init__(self, max_pending: int = 256, max_batch: int = 8) -> None:
        self.max_batch = max_batch
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    def submit(
        self, predictor: Predictor, image: np.ndarray, tiling: TilingOptions | None
    ) -> Future:
        job = _Job(predictor, image, tiling)
        try:
            self._queue.put_nowait(job)
        except queue.Full as exc:
            raise QueueFull(f"inference queue is full ({self._queue.maxsize} images)") from exc
        return job.future

    def pending(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            while len(batch) < self.max_batch:
                try:
                    extra = self._queue.get_nowait()
                except queue.Empty:
                    break
                if extra is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(extra)
            self._process(batch)

    def _process(self, batch: list[_Job]) -> None:
        groups: dict[tuple, list[_Job]] = {}
        for job in batch:
            if job.single_pass():
                groups.setdefault((id(job.predictor), job.image.shape), []).append(job)
            else:
                self._settle([job], lambda j=job: [j.predictor.detect(j.image, j.tiling)])
        for jobs in groups.values():
            size = jobs[0].predictor.preferred_batch
            for start in range(0, len(jobs), size):
                chunk = jobs[start : start + size]
                self._settle(chunk, lambda c=chunk: c[0].predictor.predict([j.image for j in c]))

    @staticmethod
    def _settle(jobs: list[_Job], run) -> None:
        try:
            results: list[Detections] = run()
        except Exception as exc:  # the worker must survive any bad input
            log.exception("inference failed for %d image(s)", len(jobs))
            for job in jobs:
                job.future.set_exception(exc)
            return
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)
