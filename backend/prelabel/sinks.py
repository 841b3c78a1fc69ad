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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..labelstudio.retry import ONE_TRY, with_retry

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
        """Images already done; a line cut short by a kill is dropped (and redone), and so
        is an image whose last line is a failure (tried again)."""
        if not self.path.is_file():
            return set()
        lines = self.path.read_text().splitlines(keepends=True)
        complete = [line for line in lines if line.endswith("\n") and _parses(line)]
        if len(complete) != len(lines):
            log.warning("%s: dropping %d incomplete line(s)", self.path, len(lines) - len(complete))
            self.path.write_text("".join(complete))
        return {r["image"] for r in latest(json.loads(line) for line in complete)
                if "error" not in r}

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


def latest(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each image's last record (a rerun's result replaces an earlier failure), in the
    order images first appeared."""
    by_image: dict[str, dict[str, Any]] = {}
    for record in records:
        by_image[record["image"]] = record
    return list(by_image.values())


def read_results(jsonl: Path) -> list[dict[str, Any]]:
    """The results file, one record per image (its last)."""
    return latest(json.loads(line) for line in jsonl.read_text().splitlines())
