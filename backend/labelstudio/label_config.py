"""The project's labeling config, read by label_studio_sdk's LabelInterface as Label Studio
reads it: which box controls draw on which Image, and which label each model class becomes.

Box controls are `<RectangleLabels toName="img">`, and `<Labels toName="img">` beside a
`<Rectangle toName="img">` (Label Studio merges the two into `rectanglelabels` regions whose
from_name is the Labels control). A class maps to a label, in order of precedence: through
an explicit mapping file, through a `<Label predicted_values="a,b">` that lists it, or by
equal names (case-insensitive). A class with no label is dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class LabelConfigError(ValueError):
    """A labeling config we cannot pre-annotate for, with the reason."""


@dataclass(frozen=True)
class RectangleControl:
    """One box control bound to `<Image name=to_name value=$data_key>`."""

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
    interface: Any = field(compare=False, repr=False)  # label_studio_sdk LabelInterface

    def usable(
        self, class_names: list[str], mapping: dict[str, str] | None = None
    ) -> list[tuple[RectangleControl, dict[int, str]]]:
        """Controls that receive at least one model class, with their class maps."""
        pairs = [(c, c.class_map(class_names, mapping)) for c in self.controls]
        return [(c, m) for c, m in pairs if m]

    def problems(self, regions: list[dict[str, Any]]) -> list[str]:
        """What Label Studio would find wrong with these prediction regions (none: [])."""
        return list(self.interface.validate_prediction({"result": regions}, return_errors=True))


def parse_label_config(xml: object) -> LabelConfig:
    """Every box control bound to an Image; raises LabelConfigError if there is none."""
    # Imported here: runs that never see a Label Studio (the batch job on files, the GPU
    # check) do not need the SDK installed.
    from label_studio_sdk.label_interface import LabelInterface

    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("the label config must be a non-empty XML string")
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises its own XML, schema and lookup errors
        raise LabelConfigError(f"label config is not valid: {exc}") from exc
    images = {o.name: o.value for o in interface.objects if o.tag == "Image"}
    geometry = {t for c in interface.controls if c.tag == "Rectangle" for t in c.to_name}
    controls = []
    for control in interface.controls:
        for to_name in control.to_name or []:
            boxes = control.tag == "RectangleLabels" or (
                control.tag == "Labels" and to_name in geometry
            )
            if boxes and to_name in images:
                controls.append(_control(control, to_name, images[to_name]))
    if not controls:
        raise LabelConfigError(
            "label config has no <RectangleLabels> (or <Labels> beside a <Rectangle>) bound "
            "to an <Image>; this backend pre-annotates bounding boxes only"
        )
    return LabelConfig(tuple(controls), interface)


def _control(control: Any, to_name: str, value: str) -> RectangleControl:
    predicted: dict[str, str] = {}
    for label, tag in (control.labels_attrs or {}).items():
        for alias in str(tag.attr.get("predicted_values") or "").split(","):
            if alias.strip():
                predicted[alias.strip().lower()] = label
    return RectangleControl(
        from_name=control.name,
        to_name=to_name,
        data_key=value[1:] if value.startswith("$") else value,
        labels=tuple(control.labels),
        predicted_values=predicted,
    )


def read_mapping(path: str | Path) -> dict[str, str]:
    """A JSON object {model class: Label Studio label}."""
    try:
        mapping = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LabelConfigError(f"label mapping {path}: {exc}") from exc
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise LabelConfigError(f'label mapping {path}: expected {{"class": "Label"}}')
    return mapping
