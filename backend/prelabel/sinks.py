"""Where a batch job's predictions go, saved as they come so a stop loses nothing done.

- Label Studio: predictions imported in chunks through the SDK, each retried through an
  outage; a task's prediction carries the model version, which is how a rerun skips it.
- Files: JSON Lines, one line per image, appended and flushed as each image finishes (the
  folder mode's progress file: a rerun skips the images it lists); the other result files
  (`backend.imagery.exports`) are written from it when the run ends.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .retry import ONE_TRY, with_retry

log = logging.getLogger(__name__)


class PredictionImporter:
    def __init__(self, client: Any, project: int, chunk: int, give_up_after: float) -> None:
        self.client = client
        self.project = project
        self.chunk = chunk
        self.give_up_after = give_up_after
        self.buffer: list[dict[str, Any]] = []
        self.imported = 0

    def add(self, task_id: int, prediction: dict[str, Any]) -> None:
        self.buffer.append({"task": task_id, **prediction})
        if len(self.buffer) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        chunk = self.buffer

        def send() -> None:
            answer = self.client.projects.import_predictions(
                id=self.project, request=chunk, request_options=ONE_TRY
            )
            if answer.created != len(chunk):  # Label Studio drops invalid ones silently
                raise RuntimeError(
                    f"Label Studio stored {answer.created} of {len(chunk)} predictions for "
                    f"tasks {[p['task'] for p in chunk]}"
                )

        with_retry(send, f"importing {len(chunk)} predictions", self.give_up_after)
        self.imported += len(chunk)
        self.buffer = []


class JsonLinesSink:
    """Append-only results file that doubles as the progress record."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done = self._recover()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a")

    def _recover(self) -> set[str]:
        """Images already done; a line cut short by a kill is dropped (and redone)."""
        if not self.path.is_file():
            return set()
        lines = self.path.read_text().splitlines(keepends=True)
        complete = [line for line in lines if line.endswith("\n") and _parses(line)]
        if len(complete) != len(lines):
            log.warning("%s: dropping %d incomplete line(s)", self.path, len(lines) - len(complete))
            self.path.write_text("".join(complete))
        return {json.loads(line)["image"] for line in complete}

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _parses(line: str) -> bool:
    try:
        return "image" in json.loads(line)
    except json.JSONDecodeError:
        return False


def read_results(jsonl: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in jsonl.read_text().splitlines()]
