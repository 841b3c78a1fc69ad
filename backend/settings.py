"""A params.yaml section read into a dataclass of defaults: each value converted to its
default's type (YAML reads `1` where a float is meant), keys the dataclass lacks left to
the stages that own them."""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def from_section(cls: type[T], section: dict[str, Any]) -> T:
    fields = cls.__dataclass_fields__  # type: ignore[attr-defined]
    return cls(**{k: type(getattr(cls, k))(v) for k, v in section.items() if k in fields})
