"""Data Manager tabs that show annotators a list of tasks: the next batch (`select`), the
frames to review and those likely empty (`prelabel --project` and `serve`, with a model's
triage threshold). One tab per title, updated in place on every run."""

from __future__ import annotations

from typing import Any

from .filters import filters


def _existing(client: Any, project: int, title: str) -> Any | None:
    found = [v for v in client.views.list(project=project)
             if (v.data or {}).get("title") == title]
    return found[0] if found else None


def tab_task_ids(client: Any, project: int, title: str) -> list[int]:
    """The task ids a tab made by `show_tasks` is filtered to (none if there is no tab)."""
    view = _existing(client, project, title)
    if view is None:
        return []
    items = ((view.data or {}).get("filters") or {}).get("items") or []
    return [int(i) for item in items if item.get("filter") == "filter:tasks:id"
            for i in item.get("value") or []]


def show_tasks(client: Any, project: int, title: str, ids: list[int],
               ordering: list[str] | None = None) -> int:
    """A tab titled `title` filtered to `ids` (created, or updated in place); its id."""
    data: dict[str, Any] = {
        "title": title,
        "filters": filters("and", ("id", "Number", "in_list", ids)),
        **({"ordering": ordering} if ordering else {}),
    }
    view = _existing(client, project, title)
    if view is not None:
        return client.views.update(id=view.id, project=project, data=data).id
    return client.views.create(project=project, data=data).id


REVIEW_TAB = "tridentloop: to review"
EMPTY_TAB = "tridentloop: likely empty"


def sort_into_tabs(client: Any, project: int, likely_empty: dict[int, bool]) -> tuple[int, int]:
    """Verdicts (task id: likely empty?) laid over the triage tabs' earlier ones, so a task
    a newer model judges otherwise changes tab; (likely empty, to review) task counts."""
    empty = set(tab_task_ids(client, project, EMPTY_TAB))
    review = set(tab_task_ids(client, project, REVIEW_TAB))
    for task, is_empty in likely_empty.items():
        (empty if is_empty else review).add(task)
        (review if is_empty else empty).discard(task)
    show_tasks(client, project, REVIEW_TAB, sorted(review))
    show_tasks(client, project, EMPTY_TAB, sorted(empty))
    return len(empty), len(review)
