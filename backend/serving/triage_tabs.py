"""Served pre-labels sorted into the Data Manager tabs "to review" and "likely empty", as
`prelabel --project` sorts its tasks, by the served model's triage threshold.

Label Studio asks for predictions a task or a page at a time; writing the tabs on every
request would add two API calls per task to the annotator's wait. Verdicts gather here and
a thread writes them every `every_s` seconds (and on shutdown). A write that fails keeps its
verdicts for the next one: an outage costs a delay, never a task's place in a tab.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from ..labelstudio.views import EMPTY_TAB, REVIEW_TAB, sort_into_tabs

log = logging.getLogger(__name__)

EVERY_S = 10.0


class TriageTabs:
    def __init__(self, client: Callable[[], Any], every_s: float = EVERY_S) -> None:
        self._make_client, self._client = client, None
        self._pending: dict[int, dict[int, bool]] = {}  # project: {task: likely empty}
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one write at a time: tabs are read, then set
        self._stop = threading.Event()
        threading.Thread(target=self._every, args=(every_s,), daemon=True,
                         name="triage-tabs").start()

    def note(self, project: str, task: int, likely_empty: bool) -> None:
        """One served task's verdict; a project id Label Studio did not send is skipped."""
        if not project.isdigit():
            return
        with self._lock:
            self._pending.setdefault(int(project), {})[task] = likely_empty

    def flush(self) -> None:
        """Write the verdicts gathered so far; those of a project that fails wait for the
        next flush (newer verdicts of the same task win)."""
        with self._flushing:
            with self._lock:
                pending, self._pending = self._pending, {}
            for project, verdicts in pending.items():
                try:
                    if self._client is None:
                        self._client = self._make_client()
                    empty, review = sort_into_tabs(self._client, project, verdicts)
                except Exception as exc:  # Label Studio down or refusing: try again later
                    log.warning("triage tabs of project %d not written (%s: %s); retrying in "
                                "the next round", project, type(exc).__name__, exc)
                    with self._lock:
                        self._pending[project] = {**verdicts, **self._pending.get(project, {})}
                    continue
                log.info("project %d: %d task(s) likely empty, %d to review (Data Manager "
                         "tabs %r and %r)", project, empty, review, EMPTY_TAB, REVIEW_TAB)

    def close(self) -> None:
        self._stop.set()
        self.flush()

    def _every(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            self.flush()
