"""Label Studio's Data Manager filters, built in one place: a tab's filter (`views`) and a
task listing's `query` (`sync`) are the same JSON."""

from __future__ import annotations

import json
from typing import Any

Item = tuple[str, str, str, Any]  # (task field, type, operator, value)


def filters(conjunction: str, *items: Item) -> dict[str, Any]:
    """`{"conjunction", "items"}` over task fields, e.g. ("id", "Number", "in_list", ids)."""
    return {"conjunction": conjunction, "items": [
        {"filter": f"filter:tasks:{field}", "type": kind, "operator": op, "value": value}
        for field, kind, op, value in items]}


def query(conjunction: str, *items: Item) -> str:
    """The same filters as a task listing's `query` parameter."""
    return json.dumps({"filters": filters(conjunction, *items)})
