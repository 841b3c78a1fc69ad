"""`tridentloop` command line: argument parsing and dispatch only; each job lives in its
own module."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .imagery.images import DEFAULT_MAX_PIXELS
from .recipe import RecipeOverrides
from .uncertainty import DEFAULT as DEFAULT_UNCERTAINTY
from .uncertainty import METHODS


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda[:N]")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "fp16", "bf16"],
        help="autocast precision of the network (boxes, scores and NMS stay fp32); "
        "bf16/fp16 run on CPU too",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NHWC activations (default: on; on CPU 13-20%% faster with folded norms)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the backbone and box head (opt-in: minutes of compiling first, "
        "then ~15-20%% faster on an H200)",
    )


def _add_tiling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "how to run the model (default: its recipe in model.json; without one, each image "
        "whole, exactly as detectron2's DefaultPredictor)"
    )
    group.add_argument("--no-tiling", action="store_true", help="run each image whole")
    group.add_argument("--tile-size", type=int, help="tile at native resolution (e.g. 800)")
    group.add_argument("--tile-overlap", type=float, help="fraction of a tile (recipe: 0.2)")
    group.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="tiles per forward pass (default: 8 on CUDA, 1 on CPU)",
    )
    group.add_argument(
        "--merge",
        choices=["nms", "greedy"],
        help="nms keeps the best box; greedy grows it over pieces split by a tile edge",
    )
    group.add_argument(
        "--merge-metric",
        choices=["iou", "ios"],
        help="overlap measure for merging: IoU or intersection over smaller",
    )
    group.add_argument("--merge-threshold", type=float)
    group.add_argument(
        "--full-image-pass",
        action=argparse.BooleanOptionalAction,
        help="also run the whole image (resized) to catch very large objects",
    )


def recipe_overrides(args: argparse.Namespace) -> RecipeOverrides:
    return RecipeOverrides(
        whole=args.no_tiling,
        tile_size=args.tile_size,
        overlap=args.tile_overlap,
        merge=args.merge,
        metric=args.merge_metric,
        threshold=args.merge_threshold,
        full_image_pass=args.full_image_pass,
        batch_size=args.batch_size,
    )


def _key_value(pair: str) -> tuple[str, str]:
    key, sep, value = pair.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{pair!r}: expected KEY=VALUE")
    return key, value


def _add_opt_arg(parser: argparse.ArgumentParser) -> None:
    """detectron2-style config overrides; `dict(args.opt)` is what the model is built with."""
    parser.add_argument(
        "--opt",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="config override, e.g. MODEL.ROI_HEADS.NMS_THRESH_TEST=0.3 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tridentloop",
        description="Detectron2/TridentNet pre-annotations for Label Studio, kept improving "
        "by a DVC active-learning loop.",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    predict = sub.add_parser("predict", help="detect objects in image files -> JSON Lines")
    source = predict.add_argument_group("model (a model directory, or config + weights)")
    source.add_argument(
        "--model", type=Path, help="directory with config.yaml, model_final.pth and labels.txt"
    )
    source.add_argument("--config", type=Path, help="detectron2 config.yaml")
    source.add_argument("--weights", type=Path, help="checkpoint (.pth or model-zoo .pkl)")
    source.add_argument("--labels", type=Path, help="class names, one per line")
    _add_opt_arg(predict)
    predict.add_argument("--output", "-o", type=Path, help="JSON Lines file (default: stdout)")
    predict.add_argument("--overlays", type=Path, help="also draw each image's boxes to a PNG here")
    predict.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse larger images (decompression-bomb guard)",
    )
    predict.add_argument("images", nargs="+", help="image files")
    _add_pixel_args(predict)
    _add_export_args(predict)
    _add_device_args(predict)
    _add_tiling_args(predict)

    bench = sub.add_parser(
        "bench",
        help="tiles/s vs torchvision's Faster R-CNN (or --prelabel, --serve, --training)",
    )
    bench.add_argument(
        "--models", nargs="+", default=None, help="cases to run (default: all); see --list"
    )
    bench.add_argument("--list", action="store_true", help="list the cases and exit")
    bench.add_argument(
        "--width",
        choices=["full", "narrow"],
        default="full",
        help="full-size ResNet-50 or the fixtures' narrow widths",
    )
    bench.add_argument(
        "--precisions", nargs="+", choices=["fp32", "fp16", "bf16"], default=None,
        help="several precisions in one run (default: --precision)",
    )
    bench.add_argument(
        "--batch-sizes", nargs="+", type=int, default=None,
        help="tiles per forward pass (default: 4; --prelabel: the device's default)",
    )
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--variants", nargs="+", default=["default"],
                       help="engine settings timed side by side: default, torchvision-nms, "
                       "torchvision-roi-align, folded, unfolded, compiled")
    bench.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time torchvision's fasterrcnn_resnet50_fpn",
    )
    bench.add_argument(
        "--survey", action="store_true", help="also report hours and cost for a whole survey"
    )
    bench.add_argument("--survey-images", type=int, default=100_000)
    bench.add_argument("--tiles-per-image", type=int, default=54)
    bench.add_argument("--price-per-hour", type=float, default=3.0, help="GPU price, $/h")
    bench.add_argument(
        "--config", default=None,
        help="model of --prelabel/--serve/--training (a bundled config name or a file)",
    )
    jobs = bench.add_mutually_exclusive_group()
    jobs.add_argument(
        "--prelabel", action="store_true",
        help="the survey batch job (decode included) vs the bare engine",
    )
    jobs.add_argument(
        "--serve", action="store_true", help="concurrent /predict load on a live backend"
    )
    jobs.add_argument(
        "--training", action="store_true", help="training images/s vs torchvision's"
    )
    jobs.add_argument("--active-learning", action="store_true",
                      help="the loop choosing by uncertainty vs at random, same label budget")
    jobs.add_argument("--counts", action="store_true",
                      help="count intervals, effort and triage on new generated surveys, "
                      "over seeds (coverage)")
    bench.add_argument("--seeds", type=int, default=20, help="--counts: surveys")
    bench.add_argument("--model-dir", type=Path, help="--counts: the model (default: the "
                       "shipped savanna source model)")
    jobs.add_argument("--pretrain-source", type=Path, metavar="DIR",
                      help="build last season's stand-in model (the shipped savanna-v1) into "
                      "DIR and say whether it reproduces the pinned SHA-256")
    jobs.add_argument("--training-memory", action="store_true",
                      help="peak RSS of the train stage on generated 6000x4000 frames")
    bench.add_argument("--training-images", type=int, default=300,
                       help="--training-memory: frames in the dataset")
    jobs.add_argument("--export", action="store_true",
                      help="the loop's export on a real Label Studio project, twice (incremental)")
    bench.add_argument("--export-tasks", type=int, default=2000, help="--export: tasks")
    jobs.add_argument("--raster", action="store_true",
                      help="peak RSS and tiles/s of prelabel on a generated tiled GeoTIFF")
    bench.add_argument("--raster-size", type=int, default=40_000,
                       help="--raster: side of the mosaic in px")
    bench.add_argument("--raster-compare-size", type=int, default=6_000,
                       help="--raster: side of the windowed-vs-whole baseline mosaic")
    bench.add_argument("--survey-bench-images", type=int, default=8, help="images (--prelabel)")
    bench.add_argument("--image-size", type=int, nargs=2, default=[6000, 4000],
                       metavar=("WIDTH", "HEIGHT"), help="generated frames (--prelabel)")
    bench.add_argument("--prelabel-ray", action="store_true",
                       help="--prelabel: also on a local Ray instance with 1 and 2 replicas")
    bench.add_argument("--requests", type=int, default=16, help="concurrent requests (--serve)")
    bench.add_argument("--tasks-per-request", type=int, default=4)
    bench.add_argument("--concurrency", nargs="+", type=int, default=[16, 64],
                       help="--serve: concurrent requests, 1 in 10 with a URL that never answers")
    bench.add_argument("--request-deadline", type=float, default=30.0, help="--serve: seconds")
    bench.add_argument("--tile-size", type=int, default=800, help="--prelabel, --raster")
    bench.add_argument("--tile-overlap", type=float, default=0.15,
                       help="--prelabel, --raster (0.15: 54 tiles on a 6000x4000 frame)")
    bench.add_argument("--train-batch", type=int, default=8, help="images per step (--training)")
    bench.add_argument("--train-iterations", type=int, default=6, help="timed steps (--training)")
    bench.add_argument("--train-precision", default="auto",
                       choices=["auto", "fp32", "fp16", "bf16"],
                       help="--training: auto is fp16 AMP on CUDA, fp32 on CPU")
    _add_device_args(bench)

    serve = sub.add_parser("serve", help="Label Studio ML backend over HTTP")
    which = serve.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="a model directory to serve")
    which.add_argument(
        "--registry", type=Path, help="a model registry: serve its current version, hot-reloaded"
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; beyond loopback needs BASIC_AUTH_USER/BASIC_AUTH_PASS "
        "(or --insecure-no-auth)",
    )
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="listen beyond loopback without basic auth (a trusted network only)",
    )
    serve.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="let task images come from loopback/private/link-local addresses (your own "
        "network); Label Studio's own URL is always allowed",
    )
    serve.add_argument(
        "--allow-cloud",
        nargs="+",
        default=[],
        choices=["s3", "gs", "az"],
        help="task images may be s3:// (gs://, az://) URIs: through Label Studio's presign "
        "endpoint, or the backend's own credentials without Label Studio",
    )
    serve.add_argument(
        "--request-deadline",
        type=float,
        default=80.0,
        help="seconds a /predict request may take; what finished is returned (Label Studio "
        "gives up at 100)",
    )
    serve.add_argument("--port", type=int, default=9090)
    serve.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="one threshold for every class instead of the model's (chosen on validation; "
        "0.5 for a model without); a project's /setup extra_params.score_threshold wins",
    )
    serve.add_argument(
        "--interactive-threshold", type=float, default=0.2,
        help="score from which smart-tool answers (a drawn region, a click) are suggested; "
        "lower than pre-labels': the annotator asked (default: %(default)s)",
    )
    serve.add_argument(
        "--label-mapping", type=Path, help='JSON {"model class": "Label Studio label"}'
    )
    serve.add_argument(
        "--local-root",
        action="append",
        default=[],
        metavar="DIR",
        help="directory task images may be read from as local paths",
    )
    serve.add_argument(
        "--train-command", default="dvc repro", help="what START_TRAINING runs, in --project-dir"
    )
    serve.add_argument("--project-dir", default=".", help="checkout the training runs in")
    serve.add_argument(
        "--work-dir",
        type=Path,
        help="cache and job logs (default: $TRIDENTLOOP_HOME or .tridentloop)",
    )
    serve.add_argument(
        "--uncertainty",
        default=DEFAULT_UNCERTAINTY,
        choices=[m for m in METHODS if m != "disagreement"],  # one forward pass per request
        help="each prediction's task score, for sorting in the Data Manager",
    )
    serve.add_argument("--cache-gb", type=float, default=2.0, help="image cache size")
    serve.add_argument("--download-timeout", type=float, default=30.0, help="seconds")
    serve.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    _add_device_args(serve)
    _add_pixel_args(serve)
    _add_opt_arg(serve)
    _add_tiling_args(serve)

    prelabel = sub.add_parser(
        "prelabel", help="pre-label a whole project or survey in one batch job (resumable)"
    )
    what = prelabel.add_mutually_exclusive_group(required=True)
    what.add_argument("--project", type=int, help="a Label Studio project id (LABEL_STUDIO_URL "
                      "and LABEL_STUDIO_API_KEY name the server)")
    what.add_argument("--images", help="image files: a folder, glob or fsspec URL (s3://...)")
    model = prelabel.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", type=Path, help="a model directory")
    model.add_argument("--registry", type=Path, help="a model registry: its current version")
    prelabel.add_argument("--model-version", help="--model: tag its predictions with this "
                          "version instead of its model.json's (tasks with a prediction of "
                          "it count as done)")
    prelabel.add_argument("--output", "-o", type=Path,
                          help="--images: JSON Lines results, also the progress file")
    prelabel.add_argument("--coco", type=Path, help="--images: also write COCO results here")
    _add_export_args(prelabel, "--images: ")
    _add_pixel_args(prelabel)
    _add_opt_arg(prelabel)
    prelabel.add_argument("--report", type=Path,
                          help="run report (default: beside --output, or in the current dir)")
    prelabel.add_argument("--uncertainty", default=DEFAULT_UNCERTAINTY, choices=METHODS,
                          help="the prediction score annotators sort by (default: %(default)s)")
    prelabel.add_argument("--score-threshold", type=float, default=None,
                          help="--project: one threshold for every class instead of the "
                          "model's (chosen on validation; 0.5 for a model without)")
    prelabel.add_argument("--label-mapping", type=Path,
                          help='--project: JSON {"model class": "Label Studio label"}')
    prelabel.add_argument("--workers", type=int, default=4,
                          help="CPU threads that fetch, decode and tile images")
    prelabel.add_argument("--chunk", type=int, default=100,
                          help="--project: predictions per import request")
    prelabel.add_argument("--retry-for", type=float, default=600.0,
                          help="seconds to keep retrying while Label Studio is unreachable")
    prelabel.add_argument("--download-timeout", type=float, default=30.0, help="seconds")
    prelabel.add_argument("--allow-private-urls", action="store_true",
                          help="--project: task images may come from your own network")
    prelabel.add_argument("--allow-cloud", nargs="+", default=[], choices=["s3", "gs", "az"],
                          help="--project: task images may be s3:// (gs://, az://) URIs")
    prelabel.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    prelabel.add_argument("--limit", type=int, help="do at most this many images this run")
    prelabel.add_argument("--only-unlabeled", action="store_true",
                          help="--project: skip tasks someone annotated or skipped")
    prelabel.add_argument("--rank-only", action="store_true",
                          help="--project: store each task's uncertainty without any box "
                          "(a model the gate held back orders the pool, shows nothing)")
    prelabel.add_argument("--ray", metavar="ADDRESS",
                          help="run on a Ray cluster (`auto`, ray://host:10001, or `local`)")
    prelabel.add_argument("--ray-workers", type=int, default=None,
                          help="model replicas on Ray (default: one per GPU, else 1)")
    _add_device_args(prelabel)
    _add_tiling_args(prelabel)

    model_cmd = sub.add_parser("model", help="make a model directory from detectron2 files, "
                               "or show one")
    model_sub = model_cmd.add_subparsers(dest="model_command", required=True)
    init = model_sub.add_parser(
        "init", help="config + weights + labels -> a validated model directory"
    )
    init.add_argument("dest", type=Path, help="the model directory to create")
    init.add_argument("--config", type=Path, required=True, help="detectron2 config.yaml")
    init.add_argument("--weights", type=Path, required=True, help="checkpoint (.pth or .pkl)")
    init.add_argument("--labels", type=Path, required=True, help="class names, one per line")
    init.add_argument("--version", help="version name (default: the directory's name)")
    init.add_argument("--tiled", type=int, metavar="TILE_SIZE",
                      help="the model runs on tiles of this size at native resolution "
                      "(default: whole images, as DefaultPredictor)")
    init.add_argument("--overlap", type=float, default=0.2, help="--tiled: fraction of a tile")
    init.add_argument("--merge", choices=["nms", "greedy"], default="nms", help="--tiled")
    init.add_argument("--merge-metric", choices=["iou", "ios"], default="iou", help="--tiled")
    init.add_argument("--merge-threshold", type=float, default=0.5, help="--tiled")
    init.add_argument("--full-image-pass", action="store_true",
                      help="--tiled: also run the whole image, for objects larger than a tile")
    show = model_sub.add_parser("show", help="recipe, classes, version and lineage")
    show.add_argument("path", type=Path, help="a model directory")
    show.add_argument("--json", action="store_true", help="one JSON object")

    rollback = sub.add_parser("rollback", help="serve the registry's previous version again")
    rollback.add_argument("--registry", type=Path, required=True)

    versions = sub.add_parser("versions", help="list a registry's versions")
    versions.add_argument("--registry", type=Path, required=True)

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
    from .effort import EffortSettings

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

    init = sub.add_parser(
        "init", help="a new git + DVC checkout of the loop for a Label Studio project")
    init.add_argument("dir", type=Path, help="the checkout to create (new or empty)")
    init.add_argument("--project", type=int, help="the Label Studio project id to learn from")
    init.add_argument("--label-studio-url", help="Label Studio's URL (params.yaml; the API key "
                      "comes from LABEL_STUDIO_API_KEY when the stages run)")
    init.add_argument("--from", dest="start", metavar="WEIGHTS",
                      help="start the loop from a pretrained or previous survey's model: a "
                      "weights file, a model directory or registry, a URL or a "
                      "detectron2:// model-zoo name (train.base_weights); checked and "
                      "downloaded now")
    init.add_argument("--remote", help="the default DVC remote for datasets and models "
                      "(s3://bucket/loop, /mnt/share/loop, ...; default: a folder "
                      "tridentloop-dvc-remote beside the checkout)")
    init.add_argument("--set", action="append", default=[], type=_key_value,
                      metavar="SECTION.KEY=VALUE",
                      help="any params.yaml setting, the value read as YAML "
                      "(e.g. train.iterations=2000, recipe.tile_size=800); repeatable")
    init.add_argument("--refresh-code", action="store_true",
                      help="in an existing checkout, replace backend/ and pipelines/ with this "
                      "installation's (after an upgrade); params and data are left alone")

    demo = sub.add_parser("demo", help="the main job on generated survey images")
    demo.add_argument("--output", type=Path, default=Path("demo-output"))
    demo.add_argument("--rounds", type=int, default=4, help="label -> retrain -> redeploy rounds")
    demo.add_argument("--images-per-round", type=int, default=8)
    demo.add_argument("--iterations", type=int, default=120,
                      help="training iterations per round (120: the demo ends within 15 min on "
                      "2 cores)")
    demo.add_argument("--seed", type=int, default=0)
    _add_device_args(demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for chatty in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as exc:
        if args.verbose:
            raise
        print(f"tridentloop {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _band_list(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of band numbers") from None


def _add_pixel_args(parser: argparse.ArgumentParser) -> None:
    pixels = parser.add_argument_group(
        "pixels of 12/16-bit, float and multi-band rasters (default: stretch each image "
        "between its 0.5th and 99.5th percentiles, first three bands)"
    )
    pixels.add_argument("--value-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="a fixed range instead, the same for every image (e.g. 0 4095)")
    pixels.add_argument("--bands", type=_band_list, metavar="R,G,B",
                        help="bands to use, numbered from 1: one, or three as R,G,B (4,1,2)")
    pixels.add_argument("--nodata", type=float,
                        help="value of pixels that hold no data (default: the GDAL_NODATA tag)")


def _add_export_args(parser: argparse.ArgumentParser, only: str = "") -> None:
    parser.add_argument("--megadetector", type=Path, metavar="FILE.json",
                        help=f"{only}also write MegaDetector batch output (Timelapse reads it)")
    parser.add_argument("--counts", type=Path, metavar="FILE.csv",
                        help=f"{only}also write counts per image and class, with the total")
    parser.add_argument("--geojson", type=Path, metavar="FILE.geojson",
                        help=f"{only}also write each detection of a GeoTIFF as a polygon in "
                        "its map coordinates")
    parser.add_argument("--count-threshold", type=float, default=None,
                        help="score from which a detection counts, for every class, "
                        "uncalibrated (default: the model's count calibration, chosen on "
                        "validation; else 0.5)")


def _predict(args: argparse.Namespace) -> int:
    from .counts import Counting
    from .imagery.exports import Exports
    from .imagery.images import PixelScaling
    from .model_dir import ModelDir, read_labels
    from .predict import run_predict

    overrides = dict(args.opt)
    device = {
        "device": args.device,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "compile": args.compile,
    }
    if args.model is not None:
        model_dir = ModelDir.open(args.model)
        predictor = model_dir.predictor(overrides, **device)
        labels, detector, recipe = model_dir.labels, model_dir.version, model_dir.recipe
        counting, triage = model_dir.counting, model_dir.triage_threshold
    elif args.config is not None and args.weights is not None:
        from .detection.predictor import Predictor

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


def _bench(args: argparse.Namespace) -> int:
    from .bench.engine import (
        CASES,
        EngineBench,
        SurveySettings,
        print_records,
        run_engine_benchmark,
    )

    if args.list:
        print("\n".join(CASES))
        return 0
    if args.prelabel:
        from .bench.prelabel import PrelabelBench, run_prelabel_benchmark

        width, height = args.image_size
        return print_records(run_prelabel_benchmark(PrelabelBench(
            config=args.config or "tridentnet_fast_R_50_C4", images=args.survey_bench_images,
            height=height, width=width, tile_size=args.tile_size,
            overlap=args.tile_overlap, device=args.device, precision=args.precision,
            batch_size=args.batch_sizes[0] if args.batch_sizes else None,
            ray=args.prelabel_ray,
        )))
    if args.serve:
        from .bench.serve import ServeBench, run_serve_benchmark

        return print_records(run_serve_benchmark(ServeBench(
            config=args.config or "tiny_tridentnet", requests=args.requests,
            tasks_per_request=args.tasks_per_request, concurrency=tuple(args.concurrency),
            request_deadline=args.request_deadline, device=args.device,
            precision=args.precision,
        )))
    if args.active_learning:
        from .bench.active_learning import ActiveLearningBench, run_active_learning_benchmark

        return print_records(run_active_learning_benchmark(ActiveLearningBench(
            device=args.device if args.device != "auto" else "cpu")))
    if args.counts:
        from .bench.counts import CountBench, run_count_benchmark

        return print_records(run_count_benchmark(CountBench(
            **({"model": args.model_dir} if args.model_dir else {}), seeds=args.seeds,
            device=args.device if args.device != "auto" else "cpu")))
    if args.pretrain_source:
        from .bench.source_model import run_source_model_build

        return print_records(run_source_model_build(args.pretrain_source))
    if args.training_memory:
        from .bench.training_memory import TrainingMemoryBench, run_training_memory_benchmark

        return print_records(run_training_memory_benchmark(TrainingMemoryBench(
            images=args.training_images, config=args.config or "tiny_tridentnet",
            device=args.device)))
    if args.export:
        from .bench.export import ExportBench, run_export_benchmark

        return print_records(run_export_benchmark(ExportBench(tasks=args.export_tasks)))
    if args.raster:
        from .bench.raster import RasterBench, run_raster_benchmark

        return print_records(run_raster_benchmark(RasterBench(
            size=args.raster_size, compare_size=args.raster_compare_size,
            config=args.config or "tiny_tridentnet", tile_size=args.tile_size,
            overlap=args.tile_overlap, device=args.device, precision=args.precision,
        )))
    if args.training:
        from .bench.training import TrainingBench, run_training_benchmark

        return print_records(run_training_benchmark(TrainingBench(
            config=args.config or "tridentnet_fast_R_50_C4", batch_size=args.train_batch,
            iterations=args.train_iterations, device=args.device,
            precision=args.train_precision,
            baseline=args.baseline,
        )))
    survey = (
        SurveySettings(args.survey_images, args.tiles_per_image, args.price_per_hour)
        if args.survey
        else None
    )
    return print_records(run_engine_benchmark(EngineBench(
        cases=tuple(args.models or CASES), precisions=tuple(args.precisions or [args.precision]),
        batch_sizes=tuple(args.batch_sizes or [4]), repeats=args.repeats, width=args.width,
        device=args.device, baseline=args.baseline, survey=survey,
        variants=tuple(args.variants), channels_last=args.channels_last,
    )))


def _serve(args: argparse.Namespace) -> int:
    from .serving.server import run_server

    return run_server(args, recipe_overrides(args))


def _prelabel(args: argparse.Namespace) -> int:
    from .prelabel.job import run_prelabel

    return run_prelabel(args, recipe_overrides(args))


def _model(args: argparse.Namespace) -> int:
    import json

    from .model_dir import ModelDir, init_model_dir
    from .recipe import parse_recipe

    if args.model_command == "init":
        recipe = parse_recipe(
            {"mode": "tiled", "tile_size": args.tiled, "overlap": args.overlap,
             "merge": args.merge, "merge_metric": args.merge_metric,
             "merge_threshold": args.merge_threshold, "full_image_pass": args.full_image_pass}
            if args.tiled else None,
            "the command line",
        )
        model = init_model_dir(args.dest, args.config, args.weights, args.labels, recipe,
                               args.version)
        print(f"model init: {model.path} loads and runs; {model.summary()['runs']}")
        return 0
    summary = ModelDir.open(args.path).summary()
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"model    {summary['path']}\nversion  {summary['version']}\n"
          f"classes  {', '.join(summary['classes'] or ['(no labels.txt)'])}\n"
          f"runs     {summary['runs']}")
    for key, value in summary["lineage"].items():
        print(f"{key:<8} {json.dumps(value) if isinstance(value, dict | list) else value}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from .registry import Registry

    registry = Registry(args.registry)
    current = registry.current_name()
    print(f"rolled back from {current} to {registry.rollback()}")
    return 0


def _versions(args: argparse.Namespace) -> int:
    import json

    from .registry import Registry

    for entry in Registry(args.registry).describe():
        print(json.dumps(entry))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from pipelines.calibrate import main as calibrate

    from .effort import EffortSettings

    if args.coco is not None and args.images is None:
        raise ValueError("--coco needs --images, the folder its images are in")
    settings = EffortSettings(**{k: getattr(args, k) for k in EffortSettings.__dataclass_fields__
                                 if hasattr(args, k)})
    return calibrate(args.model, args.coco, args.images, args.project, args.work_dir,
                     args.device, settings, args.triage_recall, args.exclude_trained)


def _init(args: argparse.Namespace) -> int:
    import yaml

    from pipelines.workspace import (
        check_settings,
        copy_code,
        create_loop_project,
        default_remote,
        updated_params,
    )

    settings: dict[str, dict] = {}
    for dotted, value in args.set:
        section, _, key = dotted.partition(".")
        if not key:
            raise ValueError(f"--set {dotted}: expected SECTION.KEY=VALUE")
        settings.setdefault(section, {})[key] = yaml.safe_load(value)
    check_settings(settings)
    if args.refresh_code:
        if not (args.dir / "dvc.yaml").is_file():
            raise ValueError(f"{args.dir} is no loop checkout (no dvc.yaml)")
        copy_code(args.dir)
        if settings:
            params = args.dir / "params.yaml"
            params.write_text(updated_params(params.read_text(), settings))
        print(f"init: replaced the code in {args.dir}"
              + (" and set " + ", ".join(a for a, _ in args.set) if settings else "")
              + "; `git diff --stat` shows what changed, commit it, then `dvc repro` re-runs "
              "the stages whose code changed")
        return 0
    if args.project is None:
        raise ValueError("give --project: the id of the Label Studio project to learn from")
    updates: dict[str, dict] = {"labelstudio": {"project": args.project}}
    if args.label_studio_url:
        updates["labelstudio"]["url"] = args.label_studio_url
    for section, values in settings.items():
        updates.setdefault(section, {}).update(values)
    if args.start:
        from .weights import resolve_start

        local = "://" not in args.start
        spec = str(Path(args.start).expanduser().absolute()) if local else args.start
        start = resolve_start(spec)
        updates.setdefault("train", {})["base_weights"] = spec
        print(f"init: the loop starts from {spec} (SHA-256 {start.sha256[:16]}...)"
              + ("" if start.labels is None else f", trained on {start.labels}; a new box "
                 "predictor is trained for this project's labels where they differ"))
    remote = args.remote or default_remote(args.dir)
    checkout = create_loop_project(args.dir, updates, remote=remote)
    print(f"init: {checkout} is a git + DVC checkout of the loop for Label Studio project "
          f"{args.project}; datasets and models are pushed to {remote} (DVC remote "
          "`storage`).\nNext:\n"
          f"  cd {checkout} && export LABEL_STUDIO_API_KEY=<token>\n"
          "  dvc repro                                   # export, train, evaluate, deploy\n"
          "  git add -A && git commit -m 'round 1' && dvc push   # this round's data and model\n"
          "  git remote add origin <url> && git push -u origin HEAD   # share the checkout\n"
          "A teammate: git clone <url> && cd <dir> && dvc pull && dvc repro")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


COMMANDS = {
    "predict": _predict,
    "serve": _serve,
    "bench": _bench,
    "prelabel": _prelabel,
    "model": _model,
    "rollback": _rollback,
    "versions": _versions,
    "demo": _demo,
    "init": _init,
    "calibrate": _calibrate,
}

if __name__ == "__main__":
    sys.exit(main())
