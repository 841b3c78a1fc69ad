"""A project's annotated tasks, read incrementally: the tasks updated since the last run are
listed (by `updated_at`, which a created, updated or deleted annotation moves), those that
changed read again, and the annotated tasks counted, the rest kept from an index on disk; a
first run, or one where many changed, reads them all through one export snapshot. Every
listing survives a Label Studio restart (`retry.with_retry`). The loop's `export` stage and
`tridentloop calibrate --project` read a project this way.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ..files import write_atomically
from .connect import LabelStudioError
from .filters import query
from .retry import ONE_TRY, with_retry

EXPORT_TIMEOUT_S = 3600
# What the dataset does not need stays out of the snapshot: predictions (hundreds of boxes a
# task once pre-labelled), drafts, annotators' records, annotation history.
_LEAN = {"drafts": {"only_id": True}, "predictions": {"only_id": True},
         "annotations__completed_by": {"only_id": True}, "include_annotation_history": False}


def annotated_tasks(client: Any, project_id: int) -> list[dict[str, Any]]:
    """Every task with an annotation (skips included), its data and annotations, through a
    Label Studio export snapshot: the server reads them in batches with the annotations
    prefetched, a third of the paginated tasks API's time on 2,000 tasks (29.8 s -> ~10 s,
    docs/benchmarks.md). The snapshot is deleted once read: repeated runs leave nothing
    behind on the server (the one-request export endpoint keeps a copy of every export)."""
    exports = client.projects.exports
    long = {"timeout": EXPORT_TIMEOUT_S}  # Label Studio without a job queue exports in-request
    snapshot = exports.create(project_id, title="tridentloop export",
                              task_filter_options={"only_with_annotations": True},
                              serialization_options=_LEAN, request_options=long)
    try:
        deadline = time.monotonic() + EXPORT_TIMEOUT_S
        while snapshot.status not in ("completed", "failed"):
            if time.monotonic() > deadline:
                raise LabelStudioError(f"Label Studio's export {snapshot.id} of project "
                                       f"{project_id} did not finish in {EXPORT_TIMEOUT_S} s")
            time.sleep(0.5)
            snapshot = exports.get(project_id, snapshot.id)
        if snapshot.status == "failed":
            raise LabelStudioError(f"Label Studio's export {snapshot.id} of project "
                                   f"{project_id} failed: see the Label Studio server's log")
        return json.loads(b"".join(exports.download(project_id, snapshot.id, export_type="JSON",
                                                    request_options=long)))
    finally:
        exports.delete(project_id, snapshot.id)


REREAD_ALL = 200  # changed tasks beyond which one export snapshot beats reading them one by one
LISTING_PAGE = 500  # a 1,000-task page makes Label Studio's SQLite fail ("Expression tree is
                    # too large (maximum depth 1000)"), measured on 2,000 tasks
# Changes are asked for from this long before the newest one the last run saw: a save still
# in its transaction while that run listed carries a time stamp before the ones it saw (a
# request's transaction takes well under a second; a new task missed would change the count).
OVERLAP = timedelta(seconds=10)


_ANNOTATED = query("or", ("total_annotations", "Number", "greater", 0),
                      ("cancelled_annotations", "Number", "greater", 0))


class TaskStore:
    """The annotated tasks as the last run read them (data and annotations, with the
    `updated_at` Label Studio listed them at), so a run reads only what changed."""

    def __init__(self, path: Path, refetch: bool) -> None:
        self.path = path
        self.tasks: dict[str, dict[str, Any]] = {}
        if path.is_file() and not refetch:
            self.tasks = json.loads(path.read_text())
        self.read = self.kept = self.removed = 0
        self.listing = ""

    def sync(self, client: Any, project_id: int) -> list[dict[str, Any]]:
        """Every annotated task (skips included), from the cache where unchanged. Only the
        tasks updated since the last run are listed and those that changed read, and the
        annotated tasks counted: a count that differs from the cache's (a task deleted)
        lists every task's id and time stamp, as a first run does."""
        before = set(self.tasks)
        self.listing = "changed tasks"
        if not (self.tasks and self._read_changed(client, project_id)
                and _annotated_count(client, project_id) == len(self.tasks)):
            self.listing = "all tasks"
            self._read_listed(client, project_id)
        self.removed = len(before - set(self.tasks))
        self.kept = len(self.tasks) - self.read
        return [self.tasks[i] for i in sorted(self.tasks, key=int)]

    def _read_changed(self, client: Any, project_id: int) -> bool:
        """The tasks updated since the last run, read into the cache; False (the cache
        untouched) when more than REREAD_ALL changed."""
        newest = max(datetime.fromisoformat(t["listed_at"]) for t in self.tasks.values())
        since = (newest - OVERLAP).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        listed = _listing(client, project_id,
                          query("and", ("updated_at", "Datetime", "greater_or_equal", since)))
        changed = {i: stamp for i, (stamp, _) in listed.items()
                   if self.tasks.get(i, {}).get("listed_at") != stamp}
        if len(changed) > REREAD_ALL:
            return False
        for i in changed:
            self.tasks.pop(i, None)
        annotated = [i for i in changed if listed[i][1]]
        for task in _tasks_by_id(client, project_id, annotated):
            self.tasks[str(task["id"])] = _entry(task, changed[str(task["id"])])
        self.read += len(annotated)
        return True

    def _read_listed(self, client: Any, project_id: int) -> None:
        """Every task's id and time stamp listed; the changed ones read again (all of them
        through an export snapshot on a first run or when many changed)."""
        listed = {i: stamp for i, (stamp, annotated) in _listing(client, project_id).items()
                  if annotated}
        changed = [i for i, stamp in listed.items()
                   if self.tasks.get(i, {}).get("listed_at") != stamp]
        if not self.tasks or len(changed) > REREAD_ALL:
            fresh = annotated_tasks(client, project_id)
        else:
            fresh = _tasks_by_id(client, project_id, changed)
        self.tasks = {i: task for i, task in self.tasks.items() if i in listed}
        for task in fresh:
            if str(task["id"]) in listed:
                self.tasks[str(task["id"])] = _entry(task, listed[str(task["id"])])
        self.read += len(changed)

    def commit(self) -> None:
        """The index for the next run: compact JSON (only that run reads it), sorted keys."""
        write_atomically(self.path, json.dumps(self.tasks, sort_keys=True,
                                               separators=(",", ":")) + "\n")


def _listing(client: Any, project_id: int, filters: str | None = None
             ) -> dict[str, tuple[str, bool]]:
    """Task id -> (its `updated_at`, whether it has an annotation or a skip), for the tasks
    `filters` selects (all without): ids and counts only, no annotations."""

    def listed() -> dict[str, tuple[str, bool]]:
        return {str(t.id): (t.updated_at.isoformat(),
                            (t.total_annotations or 0) + (t.cancelled_annotations or 0) > 0)
                for t in client.tasks.list(
                    project=project_id, fields="task_only", page_size=LISTING_PAGE,
                    query=filters, request_options=ONE_TRY,
                    include="id,updated_at,total_annotations,cancelled_annotations")}

    return with_retry(listed, f"listing the tasks of project {project_id}")


def _entry(task: dict[str, Any], listed_at: str) -> dict[str, Any]:
    """What the dataset needs of a task, and the time stamp it was read at."""
    return {"id": task["id"], "data": task.get("data") or {},
            "annotations": task.get("annotations") or [], "listed_at": listed_at}


def _annotated_count(client: Any, project_id: int) -> int:
    """How many tasks have an annotation or a skip, from one listing's total (one task)."""
    return with_retry(lambda: client.tasks.list(
        project=project_id, fields="task_only", include="id", page_size=1, query=_ANNOTATED,
        request_options=ONE_TRY).response.total or 0,
        f"counting the annotated tasks of project {project_id}")


def _tasks_by_id(client: Any, project_id: int, ids: list[str]) -> list[dict[str, Any]]:
    """These tasks with their annotations, in one listing (not a request per task)."""
    if not ids:
        return []
    chosen = json.dumps({"selectedItems": {"all": False, "included": [int(i) for i in ids]}})
    return with_retry(lambda: [t.model_dump(mode="json") for t in client.tasks.list(
        project=project_id, fields="all", query=chosen, page_size=LISTING_PAGE,
        request_options=ONE_TRY)], f"reading {len(ids)} changed tasks of project {project_id}")
