"""`tridentloop` command line: one module per command (its parser and its handler), as
DVC's `dvc/commands/`; this one builds the parser from them and dispatches."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import bench, calibrate, demo, init, model, predict, prelabel, serve

COMMANDS = (predict, bench, serve, prelabel, model, calibrate, init, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tridentloop",
        description="Detectron2/TridentNet pre-annotations for Label Studio, kept improving "
        "by a DVC active-learning loop.",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
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
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as exc:
        if args.verbose:
            raise
        print(f"tridentloop {args.command}: error: {exc}", file=sys.stderr)
        return 2
