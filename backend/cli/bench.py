"""`tridentloop bench`: the benchmarks' options; what each runs is in backend/bench/."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import add_device_args


def add_parser(sub: argparse._SubParsersAction) -> None:
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
                       "torchvision-roi-align, folded, unfolded, compiled, graphs, exact")
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
    _add_jobs(bench)
    add_device_args(bench)
    bench.set_defaults(run=run)


def _add_jobs(bench: argparse.ArgumentParser) -> None:
    """The benchmarks other than the engine's, one flag each, and their options."""
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
                      help="each way of choosing the next tiles to label (the loop's default, "
                      "random, each component alone) on new generated surveys, over seeds")
    jobs.add_argument("--uncertainty-check", action="store_true",
                      help="each uncertainty score against the corrections annotators then "
                      "make, on new generated surveys (Spearman, spread), over seeds")
    jobs.add_argument("--counts", action="store_true",
                      help="count intervals, effort and triage on new generated surveys, "
                      "over seeds (coverage)")
    jobs.add_argument("--views", action="store_true",
                      help="annotator effort and time with 1, 2 and 4 mirrored test-time "
                      "views (recipe.views) on new generated surveys, over seeds")
    _add_generated_survey_options(bench)
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
    bench.add_argument("--prelabel-decode", nargs="+", choices=["cpu", "device"],
                       default=["cpu"], help="--prelabel: where the job decodes its JPEGs, "
                       "a run each (prelabel --decode)")
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


def _add_generated_survey_options(bench: argparse.ArgumentParser) -> None:
    """Options of the benchmarks run on generated surveys over seeds (--active-learning,
    --uncertainty-check, --counts, --views)."""
    bench.add_argument("--strategies", nargs="+", default=None,
                       help="--active-learning: default random likely-animals error-rate "
                       "rare-animals embeddings (default: all)")
    bench.add_argument("--biome", default="steppe",
                       help="--active-learning: the new survey's biome (steppe: other species "
                       "than the start model's, drawn like its look-alikes, so a new head "
                       "learnt nearly from scratch; wetland: other species that it already "
                       "boxes; savanna: its own)")
    bench.add_argument("--rare-share", type=float, default=0.05,
                       help="--active-learning: the rare species' share of the animals")
    bench.add_argument("--iterations", type=int, default=40,
                       help="--active-learning: fine-tuning steps per round (the loop's own "
                       "is params.yaml's 150: ~2 h on 2 CPU cores, for a GPU)")
    bench.add_argument("--seeds", type=int, default=None,
                       help="generated surveys (--counts: 20, --active-learning: 5, --views: 5, "
                       "--uncertainty-check: 3)")
    bench.add_argument("--first-seed", type=int, default=0,
                       help="--active-learning: the first seed (another run's surveys: e.g. "
                       "--first-seed 100)")
    bench.add_argument("--val-frames", type=int, default=30,
                       help="--counts, --views: labelled frames per survey the figures are "
                       "fitted on (triage needs 32 with animals)")
    bench.add_argument("--survey-frames", type=int, default=30,
                       help="--counts, --views: new frames per survey the figures are tested on")
    bench.add_argument("--empty-fraction", type=float, default=0.92,
                       help="--counts, --views, --active-learning: share of empty tiles in the "
                       "generated surveys")
    bench.add_argument("--model-dir", type=Path, help="--counts, --views, --uncertainty-check: "
                       "the model (default: the shipped savanna source model)")


def run(args: argparse.Namespace) -> int:
    from ..bench.dispatch import run_bench

    return run_bench(args)
