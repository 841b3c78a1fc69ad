"""`tridentloop bench`: tiles per second of the engine on 800x800 survey tiles, for each
model, precision and batch size, beside torchvision's fasterrcnn_resnet50_fpn run in the
same process on the same tiles, threads and precision. Both carry a trained model's
workload (see `workload`), and every line says so with its proposals and detections per
image. Compare `ratio_vs_torchvision` across machines, never the absolute numbers.

`variants` times engine settings side by side (each on its own copy of the model, rounds
interleaved): `default`, `torchvision-nms` (torchvision's batched NMS instead of ours),
`torchvision-roi-align` (one call of torchvision's ROIAlign instead of the Triton kernel on
CUDA, or of the ROIs shared among threads on the CPU),
`folded`/`unfolded` (frozen norms folded into the convolutions or not), `compiled`
(torch.compile, opt-in), `graphs` (compiled with the backbone replayed as a CUDA Graph:
`--cuda-graphs`), `exact` (every optimisation that changes rounding off: the
`--exact` mode). Each line of a variant also gives its ratio to the first variant.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..detection.device import DeviceOptions, device_name, release_cached_memory
from ..detection.model import GeneralizedRCNN
from ..detection.predictor import Predictor
from ..synthetic import survey_scene
from .survey import survey_cost
from .timing import time_interleaved
from .workload import WorkloadCounter, calibration_tile, condition_norms, conditioned_model

CASES = {
    "tridentnet_fast_R_50_C4": ("tridentnet_fast_R_50_C4", {}),
    "tridentnet_3branch_R_50_C4": (
        "tridentnet_fast_R_50_C4",
        {"MODEL.TRIDENT.TEST_BRANCH_IDX": -1},
    ),
    "faster_rcnn_R_50_C4": ("faster_rcnn_R_50_C4", {}),
    "faster_rcnn_R_50_FPN": ("faster_rcnn_R_50_FPN", {}),
}
# The fixtures' narrow widths: the same architecture at a fraction of the cost.
NARROW = {
    "MODEL.RESNETS.WIDTH_PER_GROUP": 16,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
    "MODEL.FPN.OUT_CHANNELS": 64,
    "MODEL.ROI_BOX_HEAD.FC_DIM": 256,
}
TILE = 800
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "torchvision-nms": {"nms": "torchvision"},
    "torchvision-roi-align": {"roi_align": "torchvision"},
    "folded": {"fold_norms": True},
    "unfolded": {"fold_norms": False},
    "compiled": {"compile": "default"},
    "graphs": {"compile": "reduce-overhead"},
    "exact": {"exact": True, "channels_last": False, "fold_norms": False,
              "roi_align": "torchvision"},
}


@dataclass(frozen=True)
class SurveySettings:
    images: int = 100_000
    tiles_per_image: int = 54
    price_per_hour: float = 3.0


@dataclass(frozen=True)
class EngineBench:
    cases: tuple[str, ...] = tuple(CASES)
    precisions: tuple[str, ...] = ("fp32",)
    batch_sizes: tuple[int, ...] = (4,)
    repeats: int = 3
    width: str = "full"  # or "narrow"
    device: str = "auto"
    baseline: bool = True
    survey: SurveySettings | None = None
    variants: tuple[str, ...] = ("default",)
    channels_last: bool | None = None  # None: the device's default

    def __post_init__(self) -> None:
        unknown = sorted(set(self.cases) - set(CASES))
        if unknown:
            raise ValueError(f"unknown benchmark case(s) {unknown}; choose from {list(CASES)}")
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown or not self.variants:
            raise ValueError(f"engine variant(s) {unknown or '(none)'}: choose from "
                             f"{list(VARIANTS)}")
        if self.width not in ("full", "narrow"):
            raise ValueError(f"width {self.width!r} is not full or narrow")


def build_case(name: str, width: str) -> GeneralizedRCNN:
    """A benchmark case's model with conditioned random weights (3 classes), on the CPU."""
    config, overrides = CASES[name]
    overrides = {"MODEL.ROI_HEADS.NUM_CLASSES": 3, **overrides}
    if width == "narrow":
        overrides.update(NARROW)
    return conditioned_model(config, overrides)


def torchvision_model() -> torch.nn.Module:
    """torchvision's Faster R-CNN R50-FPN with seeded weights conditioned as ours are."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4).eval()
    tile = torch.from_numpy(calibration_tile()).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        condition_norms(model, lambda: model([tile]))
    return model


def torchvision_runner(model: torch.nn.Module, options: DeviceOptions) -> Callable:
    """The baseline in our precision and memory format; its input conversion is timed as
    ours is."""
    model.to(options.device, memory_format=options.memory_format)

    @torch.inference_mode()
    def run(tiles: list[np.ndarray]) -> list[dict]:
        batch = [options.to_device(torch.from_numpy(t)).permute(2, 0, 1).float() / 255
                 for t in tiles]
        with options.autocast():
            return model(batch)

    return run


def run_engine_benchmark(bench: EngineBench) -> Iterator[dict]:
    """One record per (case, precision, batch size), baseline fields included."""
    rng = np.random.default_rng(0)
    tiles = [survey_scene(rng, TILE, TILE, 30).image for _ in range(max(bench.batch_sizes))]
    models = {name: build_case(name, bench.width) for name in bench.cases}
    tv_model = torchvision_model() if bench.baseline else None
    for precision in bench.precisions:
        for batch in bench.batch_sizes:
            options = DeviceOptions.create(bench.device, precision, bench.channels_last,
                                           batch_size=batch)
            baseline = (
                (torchvision_runner(tv_model, options), tv_model) if tv_model is not None else None
            )
            for name, model in models.items():
                try:
                    yield from _measure(name, model, tiles[:batch], options, baseline, bench)
                except RuntimeError as exc:  # out of memory at a large batch, say
                    release_cached_memory(options.device)
                    yield {"case": name, "precision": precision, "batch": batch,
                           "device": device_name(options.device), "error": str(exc)[:300]}


def _measure(
    name: str,
    model: GeneralizedRCNN,
    tiles: list[np.ndarray],
    options: DeviceOptions,
    baseline: tuple[Callable, torch.nn.Module] | None,
    bench: EngineBench,
) -> Iterator[dict]:
    """One record per variant, every variant and the baseline timed in the same rounds."""
    settings = options.settings()
    predictors = [
        Predictor(model if len(bench.variants) == 1 else copy.deepcopy(model),
                  **{**settings, **VARIANTS[v]})
        for v in bench.variants
    ]
    shared: dict = {
        "case": name,
        "width": bench.width,
        "device": device_name(options.device),
        "precision": options.precision,
        "threads": torch.get_num_threads(),
        "batch": len(tiles),
    }
    counted = []
    for predictor in predictors:
        ours = WorkloadCounter()
        stop = ours.watch_ours(predictor.model)
        ours.add_outputs(len(tiles), sum(len(d) for d in predictor.predict(tiles)))
        stop()
        counted.append(ours.per_image())
    runs: list[Callable[[], object]] = [
        lambda p=p: p.predict(tiles) for p in predictors  # type: ignore[misc]
    ]
    if baseline is not None:
        run_baseline, tv_model = baseline
        theirs = WorkloadCounter()
        stop = theirs.watch_torchvision(tv_model)
        theirs.add_outputs(len(tiles), sum(len(o["boxes"]) for o in run_baseline(tiles)))
        stop()
        runs.append(lambda: run_baseline(tiles))
        shared.update({f"torchvision_{k}": v for k, v in theirs.per_image().items()})
    seconds = time_interleaved(runs, bench.repeats, options.device)
    for i, (variant, predictor) in enumerate(zip(bench.variants, predictors, strict=True)):
        engine = predictor.options
        record = {**shared, "variant": variant, "channels_last": engine.channels_last,
                  "nms": engine.nms, "roi_align": engine.roi_align,
                  "fold_norms": engine.fold_norms, "compile": engine.compile,
                  "exact": engine.exact, **counted[i]}
        ms = seconds[i] * 1000 / len(tiles)
        record.update({"ms_per_tile": round(ms, 2), "tiles_per_s": round(1000 / ms, 2)})
        if i > 0:
            record[f"ratio_vs_{bench.variants[0]}"] = round(seconds[i] / seconds[0], 3)
        if baseline is not None:
            baseline_ms = seconds[-1] * 1000 / len(tiles)
            record["torchvision_frcnn_r50_fpn_ms_per_tile"] = round(baseline_ms, 2)
            record["ratio_vs_torchvision"] = round(ms / baseline_ms, 3)
        if bench.survey is not None:
            s = bench.survey
            record["survey"] = survey_cost(1000 / ms, s.images, s.tiles_per_image,
                                           s.price_per_hour)
        yield record


def print_records(records: Iterator[dict]) -> int:
    """JSON Lines on stdout, flushed as each case finishes; 1 if any case failed."""
    failed = 0
    for record in records:
        failed += "error" in record
        print(json.dumps(record), flush=True)
    return 1 if failed else 0
