"""`tridentloop prelabel`: a whole project or survey pre-labelled in one resumable job."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..imagery.images import DEFAULT_MAX_PIXELS
from ..uncertainty import DEFAULT as DEFAULT_UNCERTAINTY
from ..uncertainty import METHODS
from .args import (
    add_export_args,
    add_run_args,
    label_counts,
    recipe_overrides,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    add_export_args(prelabel, "--images: ")
    add_run_args(prelabel)
    prelabel.add_argument("--report", type=Path,
                          help="run report (default: beside --output, or in the current dir)")
    prelabel.add_argument("--uncertainty", default=DEFAULT_UNCERTAINTY, choices=METHODS,
                          help="the prediction score annotators sort by (default: %(default)s)")
    prelabel.add_argument("--labelled-boxes", type=label_counts, default=None,
                          metavar="JSON",
                          help="rare-animals: boxes labelled so far per label, e.g. "
                          '\'{"Zebra": 90, "Bird": 2}\' (select passes them)')
    prelabel.add_argument("--score-threshold", type=float, default=None,
                          help="--project: one threshold for every class instead of the "
                          "model's (chosen on validation; 0.5 for a model without)")
    prelabel.add_argument("--label-mapping", type=Path,
                          help='--project: JSON {"model class": "Label Studio label"}')
    prelabel.add_argument("--workers", type=int, default=4,
                          help="CPU threads that fetch, decode and tile images")
    prelabel.add_argument("--decode", choices=["cpu", "device"], default="cpu",
                          help="where JPEGs are decoded: cpu (PIL, in --workers threads) or "
                          "device (nvJPEG on the model's GPU: the CPU side then moves "
                          "compressed bytes, not pixels; other formats stay on the CPU)")
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
    prelabel.add_argument("--shard", metavar="I/N",
                          help="--images: do shard I (from 0) of N, for array jobs; `auto` "
                          "reads AWS Batch's, SLURM's or (with TRIDENTLOOP_SHARDS) a "
                          "Kubernetes Indexed Job's array index")
    prelabel.add_argument("--merge-shards", action="store_true",
                          help="--images: merge the finished shards' results into --output "
                          "and write the exports")
    prelabel.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..prelabel.job import run_prelabel
    from ..prelabel.shards import Shard

    args.shard = None if args.shard is None else Shard.parse(args.shard)
    return run_prelabel(args, recipe_overrides(args))
