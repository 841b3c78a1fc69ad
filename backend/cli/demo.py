"""`tridentloop demo`: the main job on generated survey images."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import add_device_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="the main job on generated survey images")
    demo.add_argument("--output", type=Path, default=Path("demo-output"))
    demo.add_argument("--rounds", type=int, default=3, help="label -> retrain -> redeploy rounds")
    demo.add_argument("--animals-per-round", type=int, default=50,
                      help="each round adds the survey's next tiles until they hold this many "
                      "animals (the first round three times as many): the effort figure "
                      "rests on them")
    demo.add_argument("--iterations", type=int, default=250,
                      help="training iterations per round (250: the demo took 932 s on 2 "
                      "CPU cores)")
    demo.add_argument("--seed", type=int, default=0)
    add_device_args(demo)
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(args)
