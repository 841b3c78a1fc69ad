"""`tridentloop predict`: detect objects in image files -> JSON Lines (and the exports)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..detection.device import run_settings
from ..imagery.images import DEFAULT_MAX_PIXELS
from .args import (
    add_export_args,
    add_run_args,
    recipe_overrides,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    predict = sub.add_parser("predict", help="detect objects in image files -> JSON Lines")
    source = predict.add_argument_group("model (a model directory, or config + weights)")
    source.add_argument(
        "--model", type=Path, help="directory with config.yaml, model_final.pth and labels.txt"
    )
    source.add_argument("--config", type=Path, help="detectron2 config.yaml")
    source.add_argument("--weights", type=Path, help="checkpoint (.pth or model-zoo .pkl)")
    source.add_argument("--labels", type=Path, help="class names, one per line")
    add_run_args(predict)
    predict.add_argument("--output", "-o", type=Path, help="JSON Lines file (default: stdout)")
    predict.add_argument("--overlays", type=Path, help="also draw each image's boxes to a PNG here")
    predict.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse larger images (decompression-bomb guard)",
    )
    predict.add_argument("images", nargs="+", help="image files")
    add_export_args(predict)
    predict.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..counts import Counting
    from ..imagery.exports import Exports
    from ..imagery.images import PixelScaling
    from ..model_dir import ModelDir, read_labels
    from ..predict import run_predict

    overrides = dict(args.opt)
    device = run_settings(args)
    if args.model is not None:
        model_dir = ModelDir.open(args.model)
        predictor = model_dir.predictor(overrides, **device)
        labels, detector, recipe = model_dir.labels, model_dir.version, model_dir.recipe
        counting, triage = model_dir.counting, model_dir.triage_threshold
    elif args.config is not None and args.weights is not None:
        from ..detection.predictor import Predictor

        predictor = Predictor.from_files(args.config, args.weights, overrides, **device)
        labels, detector, recipe = None, args.weights.name, None
        counting, triage = Counting.of_model({}, None), None
    else:
        raise SystemExit("tridentloop predict: give --model DIR, or --config and --weights")
    if args.labels is not None:
        labels = read_labels(args.labels)
    counting = counting.resolve(args.count_threshold, "--count-threshold")
    if args.counts or args.megadetector:
        print(f"predict: counting {counting.describe(labels)}", file=sys.stderr)
    out = args.output.open("w") if args.output else sys.stdout
    try:
        summary = run_predict(
            args.images,
            predictor,
            out,
            recipe_overrides(args).apply(recipe, detector),
            labels,
            max_pixels=args.max_pixels,
            scaling=PixelScaling(args.value_range, args.bands, args.nodata),
            overlays=args.overlays,
            exports=Exports(args.megadetector, args.counts, counting, args.geojson,
                            triage=triage),
            detector=detector,
        )
    finally:
        if args.output:
            out.close()
    print(
        f"{summary.images} image(s), {summary.detections} detection(s), {summary.failed} failed",
        file=sys.stderr,
    )
    return 1 if summary.failed else 0
