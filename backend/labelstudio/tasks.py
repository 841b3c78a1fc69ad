"""Reading a project's tasks through the SDK, through an outage."""

from __future__ import annotations

from typing import Any

from .retry import ONE_TRY, with_retry


def list_tasks(client: Any, project: int, give_up_after: float = 600.0) -> list[dict[str, Any]]:
    """Every task of a project with its annotations and predictions, through an outage."""

    def listing() -> list[dict[str, Any]]:
        pager = client.tasks.list(project=project, fields="all", request_options=ONE_TRY)
        return [t.model_dump() for t in pager]

    return with_retry(listing, f"listing the tasks of project {project}", give_up_after)


def is_labeled(task: dict[str, Any]) -> bool:
    """Annotated or skipped by someone: no longer part of the pool to choose from."""
    return bool(task.get("annotations") or task.get("total_annotations")
                or task.get("cancelled_annotations") or task.get("is_labeled"))
