"""A /predict request's tasks run on the server's shared pool, fairly and under a deadline."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Executor, Future
from typing import Any

log = logging.getLogger(__name__)


class Busy(Exception):
    """The inference queue refused a task: the whole request is answered 503."""


class RequestRun:
    """One /predict request's tasks, at most `in_flight` on the shared pool at a time, so
    one large request cannot starve the others; answered at the deadline with what
    finished, and at once (the rest empty) when the inference queue refuses one."""

    def __init__(self, pool: Executor, in_flight: int, tasks: list[Any],
                 run: Callable[[Any], dict[str, Any]]) -> None:
        self.pool = pool
        self.run = run
        self.waiting = deque(enumerate(tasks))
        self.results: list[dict[str, Any] | None] = [None] * len(tasks)
        self.left = len(tasks)
        self.busy = False
        self.stopped = False
        self.lock = threading.Lock()
        self.done = threading.Event()
        if not tasks:
            self.done.set()
        for _ in range(min(in_flight, len(tasks))):
            self._launch()

    def wait(self, deadline: float) -> list[dict[str, Any] | None]:
        finished = self.done.wait(timeout=max(0.0, deadline - time.monotonic()))
        with self.lock:
            self.stopped = True
            if not finished:
                log.warning("request deadline: %d task(s) unfinished, answered empty",
                            sum(r is None for r in self.results))
            return list(self.results)

    def _launch(self) -> None:
        with self.lock:
            if self.stopped or self.busy or not self.waiting:
                return
            index, task = self.waiting.popleft()
        future = self.pool.submit(self.run, task)
        future.add_done_callback(lambda f, i=index: self._finish(i, f))

    def _finish(self, index: int, future: Future) -> None:
        try:
            result = future.result()
        except (Busy, CancelledError):
            result = None
            with self.lock:
                self.busy = True
        except Exception:  # _predict_task answers every failure itself; belt and braces
            log.exception("task %d of a request failed", index)
            result = None
        with self.lock:
            self.results[index] = result
            self.left -= 1
            if self.left == 0 or self.busy:
                self.done.set()
        self._launch()
