"""`tridentloop bench --prelabel`: survey throughput of the batch job in one process and on
a local Ray cluster with 1 and 2 model replicas, on the same generated images. One JSON line
per run; compare `ratio_vs_single`, not absolute numbers across machines."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..model_dir import untrained_model_dir
from ..synthetic import CLASSES, survey_scene


def _survey(root: Path, images: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(images):
        Image.fromarray(survey_scene(rng, 960, 1280, 20).image).save(root / f"s{i:03d}.png")


def run_prelabel_benchmark(args: argparse.Namespace) -> int:
    from ..cli import main

    with tempfile.TemporaryDirectory(prefix="tridentloop-bench-") as tmp:
        root = Path(tmp)
        (root / "survey").mkdir()
        _survey(root / "survey", args.survey_bench_images)
        model = untrained_model_dir(root / "model", "tiny_tridentnet", list(CLASSES)).path
        runs = [("single", None), ("ray", 1), ("ray", 2)]
        single = None
        for runner, workers in runs:
            out = root / f"{runner}{workers or ''}.jsonl"
            cli = ["prelabel", "--images", str(root / "survey"), "--model", str(model),
                   "--output", str(out), "--device", args.device, "--tile-size", "320"]
            if args.threads:
                cli += ["--threads", str(args.threads)]
            if workers:
                cli += ["--ray", "local", "--ray-workers", str(workers)]
            main(cli)
            report = json.loads(out.with_name(out.stem + ".report.json").read_text())
            rate = report["tiles"] / report["seconds"]
            single = single or rate
            print(json.dumps({
                "case": "prelabel", "runner": runner, "workers": workers or 1,
                "images": report["done"], "tiles": report["tiles"],
                "seconds": report["seconds"], "tiles_per_s": round(rate, 2),
                "ratio_vs_single": round(rate / single, 3),
            }), flush=True)
    return 0
