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

from backend.counts import COUNTS_KEY, TRIAGE_KEY, describe_count
from backend.effort import EffortSettings
from backend.model_dir import ModelDir
from backend.thresholds import METADATA_KEY, describe_threshold

from .evaluate import calibration_figures, detections_for
from .params import fail, open_label_studio


def project_data(project: int, work_dir: Path) -> tuple[dict[str, Any], Path]:
    """A Label Studio project's accepted annotations as COCO, images under `work_dir`."""
    import os

    from backend.media.fetch import MediaFetcher, MediaSettings

    from .export import export_project

    url, key = os.environ.get("LABEL_STUDIO_URL"), os.environ.get("LABEL_STUDIO_API_KEY")
    if not url or not key:
        fail("calibrate --project needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY set")
    client, found = open_label_studio(url, key, project, "calibrate")
    coco, _ = export_project(client, found, work_dir,
                             MediaFetcher(MediaSettings(label_studio_url=url, api_key=key)))
    return coco, work_dir / "images"


def calibrate(model: ModelDir, coco: dict[str, Any], images: Path, source: str,
              device: str = "auto", settings: EffortSettings | None = None,
              triage_recall: float = 0.95) -> dict[str, Any]:
    """Choose the thresholds, count calibration and triage on `coco`, write them into
    model.json; the figures at them."""
    if not coco.get("images"):
        fail(f"{source} has no images to calibrate on")
    records = detections_for(model, coco, images, model.recipe, device)
    figures, _ = calibration_figures(coco, records, settings or EffortSettings(), triage_recall)
    stamp = {"chosen_on": source, "images": len(coco["images"]), "chosen_at": time.time()}
    model.update_metadata({METADATA_KEY: {**figures["score_thresholds"], **stamp},
                           COUNTS_KEY: {**figures["count_calibration"], **stamp},
                           TRIAGE_KEY: {**figures["triage"], **stamp}})
    return figures


def table(figures: dict[str, Any]) -> str:
    """The per-class table (annotators' figures, then the count with its interval) and the
    overall lines, as printed."""
    head = (f"{'class':<16}{'threshold':>12}{'kept':>6}{'adjusted':>9}{'deleted':>8}"
            f"{'drawn':>6}{'effort':>7}{'precision':>10}{'recall':>7}  count [95%] (true)")
    lines = [head]
    effort, counted = figures["effort"], figures["counts"]["per_class"]
    for name, row in effort["per_class"].items():
        count = counted[name]
        shown = describe_count(count)
        lines.append(
            f"{name:<16}{describe_threshold(row['threshold']):>12}{row['kept']:>6}"
            f"{row['adjusted']:>9}{row['deleted']:>8}{row['drawn']:>6}"
            f"{row['effort_ratio']:>7.3f}{_fraction(row['precision']):>10}"
            f"{_fraction(row['recall']):>7}  {shown} ({count['count_true']})")
    overall, held = effort["overall"], figures["effort_out_of_sample"]
    lines.append(f"overall: effort ratio {overall['effort_ratio']:.3f} in sample, "
                 f"{held['effort_ratio']:.3f} [{held['low']:.3f}, {held['high']:.3f}] out of "
                 f"sample (1.0: drawing every box), {overall['corrections_per_image']:.2f} "
                 f"corrections per image over {effort['images']} images")
    triage = figures["triage"]
    lines.append(f"triage: images scoring below {_fraction(triage['threshold'])} are likely "
                 f"empty: {triage['skipped_share']:.1%} of these images, holding "
                 f"{triage['animals_in_skipped']} animals ({triage['recall_target']:.0%} of "
                 "images with animals kept)")
    return "\n".join(lines)


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def without_trained(coco: dict[str, Any], model: ModelDir, exclude: bool
                    ) -> dict[str, Any]:
    """Figures on images a model was trained on flatter it: say how many of these tasks its
    lineage names, and with `exclude` leave them out."""
    trained = set(model.metadata.get("train_tasks") or ())
    seen = [im["id"] for im in coco["images"] if im["id"] in trained]
    if not seen:
        return coco
    if not exclude:
        print(f"warning: {model.path} was trained on {len(seen)} of these "
              f"{len(coco['images'])} tasks (its lineage's train_tasks): the figures there are "
              "optimistic; --exclude-trained leaves them out")
        return coco
    keep = {im["id"] for im in coco["images"]} - set(seen)
    print(f"calibrate: left out the {len(seen)} tasks {model.path} was trained on; "
          f"{len(keep)} remain")
    return {**coco, "images": [im for im in coco["images"] if im["id"] in keep],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in keep]}


def dvc_stage_owning(path: Path) -> str | None:
    """The DVC stage (or .dvc file) whose output holds `path`; None outside one. Editing
    such an output in place makes `dvc status` show its stage changed and the next repro
    silently adopt, or overwrite, the edit."""
    from dvc.exceptions import NotDvcRepoError, OutputNotFoundError
    from dvc.repo import Repo

    try:
        root = Repo.find_root(str(path))
    except NotDvcRepoError:
        return None
    with Repo(root) as repo:
        try:
            outs = repo.find_outs_by_path(str(path.absolute()), strict=False)
        except OutputNotFoundError:
            return None
    return outs[0].stage.addressing


def main(model_path: Path, coco_file: Path | None, images: Path | None, project: int | None,
         work_dir: Path, device: str, settings: EffortSettings, triage_recall: float = 0.95,
         exclude_trained: bool = False) -> int:
    model = ModelDir.open(model_path)
    stage = dvc_stage_owning(model.path)
    if stage is not None:
        fail(f"{model.path} is an output of the DVC stage {stage!r}: calibrate writes into "
             "model.json, and an edited DVC output is what the next `dvc repro` re-runs or "
             f"adopts. Calibrate a copy (cp -r {model.path} my-model) or a version in the "
             "registry (models/registry/versions/<v>), which DVC does not track")
    if project is not None:
        coco, image_dir = project_data(project, work_dir)
        coco = without_trained(coco, model, exclude_trained)
        source = f"Label Studio project {project}"
    else:
        assert coco_file is not None and images is not None
        coco, image_dir = json.loads(coco_file.read_text()), images
        source = str(coco_file)
    figures = calibrate(model, coco, image_dir, source, device, settings, triage_recall)
    print(table(figures))
    offered = [n for n, t in figures["score_thresholds"]["per_class"].items() if t is not None]
    withheld = figures["score_thresholds"]["withheld"]
    print(f"calibrate: wrote the thresholds, count calibration and triage into "
          f"{model.path / 'model.json'}; serve, prelabel and predict "
          + (f"now offer boxes of {', '.join(offered)}" if offered else "offer no boxes")
          + "".join(f"; {name} not offered: {why}" for name, why in withheld.items())
          + "; every class is counted")
    return 0
