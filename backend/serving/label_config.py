"""The project's labeling XML: which RectangleLabels controls draw on which Image, and which
label each model class becomes.

A class maps to a label, in order of precedence: through an explicit mapping file, through a
`<Label predicted_values="...">` that lists it, or by equal names (case-insensitive). A
class with no label is dropped.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path


class LabelConfigError(ValueError):
    """A labeling config we cannot pre-annotate for, with the reason."""


@dataclass(frozen=True)
class RectangleControl:
    """One `<RectangleLabels name=from_name toName=to_name>` bound to `<Image value=$key>`."""

    from_name: str
    to_name: str
    data_key: str
    labels: tuple[str, ...]
    predicted_values: dict[str, str] = field(default_factory=dict)  # lower(class) -> label

    def class_map(
        self, class_names: list[str], mapping: dict[str, str] | None = None
    ) -> dict[int, str]:
        """Model class id -> label of this control, for every class that has one."""
        by_lower = {label.lower(): label for label in self.labels}
        explicit = {k.lower(): v for k, v in (mapping or {}).items()}
        result = {}
        for class_id, name in enumerate(class_names):
            key = name.lower()
            label = (
                explicit.get(key)
                if key in explicit
                else self.predicted_values.get(key) or by_lower.get(key)
            )
            if label is not None and label in self.labels:
                result[class_id] = label
        return result


@dataclass(frozen=True)
class LabelConfig:
    controls: tuple[RectangleControl, ...]

    def usable(
        self, class_names: list[str], mapping: dict[str, str] | None = None
    ) -> list[tuple[RectangleControl, dict[int, str]]]:
        """Controls that receive at least one model class, with their class maps."""
        pairs = [(c, c.class_map(class_names, mapping)) for c in self.controls]
        return [(c, m) for c, m in pairs if m]


def parse_label_config(xml: str) -> LabelConfig:
    """Every RectangleLabels bound to an Image; raises if there is none."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelConfigError(f"label config is not valid XML: {exc}") from exc
    images = {el.get("name"): el.get("value", "") for el in root.iter("Image") if el.get("name")}
    controls = []
    for el in root.iter("RectangleLabels"):
        to_name = el.get("toName", "")
        if to_name not in images:
            continue
        value = images[to_name]
        labels = tuple(lbl.get("value", "") for lbl in el.iter("Label") if lbl.get("value"))
        predicted = {}
        for lbl in el.iter("Label"):
            for alias in (lbl.get("predicted_values") or "").split(","):
                if alias.strip():
                    predicted[alias.strip().lower()] = lbl.get("value", "")
        controls.append(
            RectangleControl(
                from_name=el.get("name", ""),
                to_name=to_name,
                data_key=value[1:] if value.startswith("$") else value,
                labels=labels,
                predicted_values=predicted,
            )
        )
    if not controls:
        raise LabelConfigError(
            "label config has no <RectangleLabels> bound to an <Image> (toName must name an "
            "Image tag); this backend pre-annotates bounding boxes only"
        )
    return LabelConfig(tuple(controls))


def read_mapping(path: str | Path) -> dict[str, str]:
    """A JSON object {model class: Label Studio label}."""
    try:
        mapping = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LabelConfigError(f"label mapping {path}: {exc}") from exc
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise LabelConfigError(f'label mapping {path}: expected {{"class": "Label"}}')
    return mapping
