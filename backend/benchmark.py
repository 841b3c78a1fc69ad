"""`tridentloop bench`: milliseconds per 800x800 tile for our engine and, in the same
process on the same tiles and threads, torchvision's fasterrcnn_resnet50_fpn (random
weights) as the baseline. One JSON line per case; the ratio is what to compare across
machines, never the absolute numbers.

`--survey` turns the measured tiles/s into hours and money for a whole survey.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from .detection.config import bundled_config, load_config
from .detection.model import GeneralizedRCNN
from .detection.predictor import Predictor
from .synthetic import survey_scene

CASES = {
    "tridentnet_fast_R_50_C4": "tridentnet_fast_R_50_C4",
    "faster_rcnn_R_50_FPN": "faster_rcnn_R_50_FPN",
    "faster_rcnn_R_50_C4": "faster_rcnn_R_50_C4",
    "tridentnet_3branch_R_50_C4": "tridentnet_fast_R_50_C4",
}
_NARROW = {
    "MODEL.RESNETS.WIDTH_PER_GROUP": 16,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
    "MODEL.FPN.OUT_CHANNELS": 64,
    "MODEL.ROI_BOX_HEAD.FC_DIM": 256,
}


def build_case(name: str, width: str) -> GeneralizedRCNN:
    overrides: dict[str, object] = {"MODEL.ROI_HEADS.NUM_CLASSES": 3}
    if name == "tridentnet_3branch_R_50_C4":
        overrides["MODEL.TRIDENT.TEST_BRANCH_IDX"] = -1
    if width == "narrow":
        overrides.update(_NARROW)
    torch.manual_seed(0)
    return GeneralizedRCNN(load_config(bundled_config(CASES[name]), overrides))


def _time_interleaved(
    runs: list[Callable[[], object]], repeats: int, device: torch.device
) -> list[float]:
    """Best wall time (s) of each run over `repeats` rounds after one warm-up round; the runs
    alternate within each round so that load on the machine hits them alike."""
    best = [float("inf")] * len(runs)
    for round_ in range(repeats + 1):
        for i, run in enumerate(runs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_ > 0:
                best[i] = min(best[i], time.perf_counter() - start)
    return best


def _baseline(device: torch.device, precision: str) -> Callable[[list[np.ndarray]], object]:
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4)
    model.eval().to(device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    @torch.inference_mode()
    def run(tiles: list[np.ndarray]) -> object:
        batch = [torch.from_numpy(t).to(device).permute(2, 0, 1).float() / 255 for t in tiles]
        with torch.autocast(
            device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda"
        ):
            return model(batch)

    return run


def run_benchmark(args: argparse.Namespace) -> int:
    if args.list:
        print("\n".join(CASES))
        return 0
    names = args.models or [
        n for n in CASES if n != "tridentnet_3branch_R_50_C4" or torch.cuda.is_available()
    ]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise ValueError(f"unknown benchmark case(s) {unknown}; choose from {list(CASES)}")
    rng = np.random.default_rng(0)
    tiles = [survey_scene(rng, 800, 800, 30).image for _ in range(args.tiles)]
    for name in names:
        predictor = Predictor(
            build_case(name, args.width), device=args.device, precision=args.precision
        )
        device = predictor.device
        runs: list[Callable[[], object]] = [lambda p=predictor: p.predict(tiles)]
        if args.baseline:
            baseline = _baseline(device, args.precision)
            runs.append(lambda b=baseline: b(tiles))
        ours, *base = _time_interleaved(runs, args.repeats, device)
        ms = ours * 1000 / len(tiles)
        record = {
            "case": name,
            "width": args.width,
            "device": _device_name(device),
            "precision": args.precision if device.type == "cuda" else "fp32",
            "threads": torch.get_num_threads(),
            "batch": len(tiles),
            "ms_per_tile": round(ms, 2),
            "tiles_per_s": round(1000 / ms, 2),
        }
        if base:
            baseline_ms = base[0] * 1000 / len(tiles)
            record["torchvision_frcnn_r50_fpn_ms_per_tile"] = round(baseline_ms, 2)
            record["ratio_vs_torchvision"] = round(ms / baseline_ms, 3)
        if getattr(args, "survey", False):
            record["survey"] = survey_cost(
                1000 / ms, args.survey_images, args.tiles_per_image, args.price_per_hour
            )
        print(json.dumps(record), flush=True)
    return 0


def survey_cost(
    tiles_per_s: float, images: int, tiles_per_image: int, price_per_hour: float
) -> dict[str, float]:
    """Hours and money to pre-label `images` x `tiles_per_image` tiles at a measured rate."""
    hours = images * tiles_per_image / tiles_per_s / 3600
    return {
        "images": images,
        "tiles_per_image": tiles_per_image,
        "hours": round(hours, 2),
        "cost": round(hours * price_per_hour, 2),
        "price_per_hour": price_per_hour,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
