"""`tridentloop serve`: the Label Studio ML backend over HTTP."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..imagery.images import DEFAULT_MAX_PIXELS
from ..uncertainty import DEFAULT as DEFAULT_UNCERTAINTY
from ..uncertainty import METHODS
from .args import (
    add_run_args,
    recipe_overrides,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    _add_answer_options(serve)
    add_run_args(serve)
    serve.set_defaults(run=run)


def _add_answer_options(serve: argparse.ArgumentParser) -> None:
    """What the backend answers with, where images may come from, where training runs."""
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


def run(args: argparse.Namespace) -> int:
    from ..serving.server import run_server

    return run_server(args, recipe_overrides(args))
