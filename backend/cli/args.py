"""Argument groups several commands share: the device, the exact mode, tiling, config
overrides, raster pixels and the survey exports."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..recipe import RecipeOverrides


def add_device_args(parser: argparse.ArgumentParser) -> None:
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
        action="store_const",
        const="default",
        help="torch.compile the backbone and box head (opt-in: minutes of compiling first, "
        "then ~15-20%% faster on an H200)",
    )
    parser.add_argument(
        "--cuda-graphs",
        dest="compile",
        action="store_const",
        const="reduce-overhead",
        help="--compile, and the backbone replayed as a CUDA Graph (torch.compile's "
        "reduce-overhead mode): one launch per batch instead of hundreds",
    )


def add_exact_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--exact", action="store_true",
        help="round as detectron2's DefaultPredictor does: fp32, NCHW, norms unfolded, "
        "torchvision's ROIAlign, one image per pass (on the CPU, bit for bit; slower: "
        "docs/benchmarks.md). A model asks for it with \"exact\": true in model.json",
    )


def add_tiling_args(parser: argparse.ArgumentParser) -> None:
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


def label_counts(text: str) -> dict[str, int]:
    """A JSON object of label names and box counts, as `select` passes them."""
    try:
        counts = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({exc})") from None
    if not isinstance(counts, dict) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts.values()):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected an object of label names and box counts, e.g. "
            '\'{"Zebra": 90, "Bird": 2}\'')
    return counts


def key_value(pair: str) -> tuple[str, str]:
    key, sep, value = pair.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{pair!r}: expected KEY=VALUE")
    return key, value


def add_opt_arg(parser: argparse.ArgumentParser) -> None:
    """detectron2-style config overrides; `dict(args.opt)` is what the model is built with."""
    parser.add_argument(
        "--opt",
        action="append",
        default=[],
        type=key_value,
        metavar="KEY=VALUE",
        help="config override, e.g. MODEL.ROI_HEADS.NMS_THRESH_TEST=0.3 (repeatable)",
    )


def band_list(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of band numbers") from None


def add_pixel_args(parser: argparse.ArgumentParser) -> None:
    pixels = parser.add_argument_group(
        "pixels of 12/16-bit, float and multi-band rasters (default: stretch each image "
        "between its 0.5th and 99.5th percentiles, first three bands)"
    )
    pixels.add_argument("--value-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="a fixed range instead, the same for every image (e.g. 0 4095)")
    pixels.add_argument("--bands", type=band_list, metavar="R,G,B",
                        help="bands to use, numbered from 1: one, or three as R,G,B (4,1,2)")
    pixels.add_argument("--nodata", type=float,
                        help="value of pixels that hold no data (default: the GDAL_NODATA tag)")


def add_export_args(parser: argparse.ArgumentParser, only: str = "") -> None:
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


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """How a model runs, for every command that runs one (predict, serve, prelabel): the
    device, the exact mode, raster pixels, config overrides and tiling."""
    add_device_args(parser)
    add_exact_arg(parser)
    add_pixel_args(parser)
    add_opt_arg(parser)
    add_tiling_args(parser)
