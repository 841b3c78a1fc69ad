"""`tridentloop calibrate`: score thresholds for a model brought from outside (`tridentloop
model init`), chosen on labelled data the user has, as the loop's `evaluate` chooses them:
per class, the fewest corrections for annotators (backend/effort.py). They are written into
the model's model.json, so `serve`, `prelabel` and `predict` offer its boxes by them, and
the same table the loop reports is printed: effort ratio, corrections per image, precision,
recall and survey counts per class.

The data is a COCO file with its images, or a Label Studio project's accepted annotations
(exported as the loop's `export` stage does, images cached in `--work-dir`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from backend.effort import NOT_OFFERED, EffortSettings
from backend.model_dir import ModelDir
from backend.thresholds import METADATA_KEY

from .evaluate import detections_for, effort_figures
from .params import fail


def project_data(project: int, work_dir: Path) -> tuple[dict[str, Any], Path]:
    """A Label Studio project's accepted annotations as COCO, images under `work_dir`."""
    import os

    from label_studio_sdk import LabelStudio

    from backend.media.fetch import MediaFetcher, MediaSettings

    from .export import export_project

    url, key = os.environ.get("LABEL_STUDIO_URL"), os.environ.get("LABEL_STUDIO_API_KEY")
    if not url or not key:
        fail("calibrate --project needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY set")
    coco, _ = export_project(LabelStudio(base_url=url, api_key=key), project, work_dir,
                             MediaFetcher(MediaSettings(label_studio_url=url, api_key=key)))
    return coco, work_dir / "images"


def calibrate(model: ModelDir, coco: dict[str, Any], images: Path, source: str,
              device: str = "auto", settings: EffortSettings | None = None
              ) -> dict[str, Any]:
    """Choose the thresholds on `coco`, write them into model.json; the figures at them."""
    if not coco.get("images"):
        fail(f"{source} has no images to calibrate on")
    records = detections_for(model, coco, images, model.recipe, device)
    chosen, figures, _ = effort_figures(coco, records, settings or EffortSettings())
    model.update_metadata({METADATA_KEY: {**chosen, "chosen_on": source,
                                          "images": len(coco["images"]),
                                          "chosen_at": time.time()}})
    return figures


def table(figures: dict[str, Any]) -> str:
    """The per-class table and the overall line, as printed."""
    head = (f"{'class':<16}{'threshold':>10}{'kept':>7}{'deleted':>8}{'drawn':>7}"
            f"{'effort':>8}{'precision':>10}{'recall':>8}{'count':>8}{'true':>7}")
    lines = [head]
    for name, row in figures["per_class"].items():
        shown = "not offd" if row["threshold"] >= NOT_OFFERED else f"{row['threshold']:.3f}"
        lines.append(
            f"{name:<16}{shown:>10}{row['kept']:>7}{row['deleted']:>8}{row['drawn']:>7}"
            f"{row['effort_ratio']:>8.3f}{_fraction(row['precision']):>10}"
            f"{_fraction(row['recall']):>8}{row['count_predicted']:>8}{row['count_true']:>7}")
    overall = figures["overall"]
    lines.append(f"overall: effort ratio {overall['effort_ratio']:.3f} (1.0: drawing every box), "
                 f"{overall['corrections_per_image']:.2f} corrections per image over "
                 f"{figures['images']} images")
    return "\n".join(lines)


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(model_path: Path, coco_file: Path | None, images: Path | None, project: int | None,
         work_dir: Path, device: str, settings: EffortSettings) -> int:
    model = ModelDir.open(model_path)
    if project is not None:
        coco, image_dir = project_data(project, work_dir)
        source = f"Label Studio project {project}"
    else:
        assert coco_file is not None and images is not None
        coco, image_dir = json.loads(coco_file.read_text()), images
        source = str(coco_file)
    figures = calibrate(model, coco, image_dir, source, device, settings)
    print(table(figures))
    print(f"calibrate: wrote the thresholds into {model.path / 'model.json'}; serve, prelabel "
          "and predict now offer boxes by them")
    return 0
