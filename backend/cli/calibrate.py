"""`tridentloop calibrate`: a model's thresholds chosen on labelled data."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    calibrate = sub.add_parser(
        "calibrate", help="choose a model's score thresholds on labelled data (annotator "
        "effort) and write them into its model.json")
    calibrate.add_argument("--model", type=Path, required=True, help="the model directory")
    data = calibrate.add_mutually_exclusive_group(required=True)
    data.add_argument("--coco", type=Path, help="a COCO file of labelled images")
    data.add_argument("--project", type=int, help="a Label Studio project's accepted "
                      "annotations (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY)")
    calibrate.add_argument("--images", type=Path, help="--coco: the folder its file_names are in")
    calibrate.add_argument("--work-dir", type=Path, default=Path(".tridentloop/calibrate"),
                           help="--project: where its images are cached")
    calibrate.add_argument("--device", default="auto")
    from ..effort import EffortSettings

    effort = EffortSettings()
    helps = {"iou": "how well a pre-label must match a true box to be kept or adjusted",
             "keep_iou": "from this IoU on it is kept as it is",
             "delete_cost": "a deletion's cost, in the unit of --draw-cost",
             "adjust_cost": "moving a loose box's edges", "draw_cost": "drawing a box",
             "min_boxes": "a class with fewer labelled boxes is not offered (no evidence)",
             "confidence": "that the offered boxes' precision clears break-even",
             "offer_rare": "withhold, or pooled: a class without evidence takes the "
                           "pooled threshold"}
    for name, text in helps.items():
        default = getattr(effort, name)
        calibrate.add_argument(f"--{name.replace('_', '-')}", type=type(default),
                               default=default, help=f"{text} (default {default})")
    calibrate.add_argument("--exclude-trained", action="store_true",
                           help="--project: leave out the tasks the model was trained on "
                           "(its lineage's train_tasks)")
    calibrate.add_argument("--triage-recall", type=float, default=0.95,
                           help="the likely-empty threshold keeps this share of the images "
                           "with animals")
    calibrate.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.calibrate import main as calibrate

    from ..effort import EffortSettings

    if args.coco is not None and args.images is None:
        raise ValueError("--coco needs --images, the folder its images are in")
    settings = EffortSettings(**{k: getattr(args, k) for k in EffortSettings.__dataclass_fields__
                                 if hasattr(args, k)})
    return calibrate(args.model, args.coco, args.images, args.project, args.work_dir,
                     args.device, settings, args.triage_recall, args.exclude_trained)
