"""`python -m backend.bench.profile`: where one engine case spends its time, so that a
change to the GPU path is aimed at the largest cost before it is made (see
docs/benchmarks.md). Prints the model's stages (modules two levels deep) and the top
operators by device time as JSON Lines, after warm-up, with torch.profiler.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn
from torch.profiler import profile, record_function

from ..detection.device import DeviceOptions, device_name, profiler_activities, synchronize
from ..detection.predictor import Predictor
from ..synthetic import survey_scene
from .engine import CASES, TILE, build_case


def label_stages(model: nn.Module, depth: int = 2) -> Callable[[], None]:
    """Wrap each module down to `depth` in a profiler range named by its path."""
    handles = []
    for path, module in model.named_modules():
        if not path or path.count(".") >= depth:
            continue
        ranges: list[record_function] = []

        def enter(_m: nn.Module, _args: object, path: str = path, ranges=ranges) -> None:
            ranges.append(record_function(f"stage:{path}"))
            ranges[-1].__enter__()

        def leave(_m: nn.Module, _args: object, _out: object, ranges=ranges) -> None:
            ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return lambda: [h.remove() for h in handles]


def _device_us(event: object, own: bool = False) -> float:
    """Device time of a profiler row (torch renamed cuda_* to device_* in 2.4)."""
    prefix = "self_" if own else ""
    for name in (f"{prefix}device_time_total", f"{prefix}cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


@dataclass(frozen=True)
class ProfileRun:
    case: str = "tridentnet_fast_R_50_C4"
    precision: str = "bf16"
    batch: int = 16
    device: str = "auto"
    width: str = "full"
    runs: int = 3
    top: int = 25
    channels_last: bool | None = None
    sort: str = "device"  # or "cpu"
    shapes: bool = False


def profile_case(run: ProfileRun) -> list[dict]:
    """A head line (ms per tile under the profiler), one line per stage and the top
    operators, all in ms per tile."""
    rng = np.random.default_rng(0)
    tiles = [survey_scene(rng, TILE, TILE, 30).image for _ in range(run.batch)]
    options = DeviceOptions.create(run.device, run.precision, run.channels_last,
                                   batch_size=run.batch)
    predictor = Predictor(build_case(run.case, run.width), options.device, options.precision,
                          options.channels_last, options.pin_memory, options.batch_size)
    for _ in range(2):
        predictor.predict(tiles)
    synchronize(options.device)
    stop = label_stages(predictor.model)
    start = time.perf_counter()
    with profile(activities=profiler_activities(options.device),
                 record_shapes=run.shapes) as prof:
        for _ in range(run.runs):
            predictor.predict(tiles)
        synchronize(options.device)
    wall = time.perf_counter() - start
    stop()
    per_tile = run.runs * run.batch * 1000  # profiler microseconds -> ms per tile
    head = {"case": run.case, "device": device_name(options.device),
            "precision": run.precision, "batch": run.batch,
            "channels_last": options.channels_last, "runs": run.runs,
            "ms_per_tile": round(wall * 1000 / run.runs / run.batch, 2)}
    return [head, *_stages(prof, per_tile), *_operators(prof, per_tile, run)]


def _stages(prof: profile, per_tile: int) -> list[dict]:
    """A stage's host range and its device range come as two rows: one line each."""
    merged: dict[str, dict] = {}
    for event in prof.key_averages():
        if event.key.startswith("stage:"):
            row = merged.setdefault(event.key[6:], {"cpu_ms_per_tile": 0.0,
                                                    "device_ms_per_tile": 0.0})
            row["cpu_ms_per_tile"] = max(row["cpu_ms_per_tile"],
                                         round(event.cpu_time_total / per_tile, 3))
            row["device_ms_per_tile"] = max(row["device_ms_per_tile"],
                                            round(_device_us(event) / per_tile, 3))
    return [{"stage": name, **row} for name, row in sorted(merged.items())]


def _operators(prof: profile, per_tile: int, run: ProfileRun) -> list[dict]:
    def cost(event: object) -> tuple[float, float]:
        spent = (_device_us(event, own=True), event.self_cpu_time_total)
        return spent if run.sort == "device" else spent[::-1]

    events = [e for e in prof.key_averages(group_by_input_shape=run.shapes)
              if not e.key.startswith("stage:")]
    return [{"op": e.key[:80], "calls": e.count,
             **({"shapes": str(e.input_shapes)[:160]} if run.shapes else {}),
             "self_device_ms_per_tile": round(_device_us(e, own=True) / per_tile, 3),
             "self_cpu_ms_per_tile": round(e.self_cpu_time_total / per_tile, 3)}
            for e in sorted(events, key=cost, reverse=True)[:run.top]]


def main(argv: list[str] | None = None) -> int:
    defaults = ProfileRun()
    parser = argparse.ArgumentParser(prog="profile", description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=list(CASES), default=defaults.case)
    parser.add_argument("--precision", default=defaults.precision)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--width", choices=["full", "narrow"], default=defaults.width)
    parser.add_argument("--runs", type=int, default=defaults.runs)
    parser.add_argument("--top", type=int, default=defaults.top)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--sort", choices=["device", "cpu"], default=defaults.sort)
    parser.add_argument("--shapes", action="store_true", help="group operators by input shape")
    for record in profile_case(ProfileRun(**vars(parser.parse_args(argv)))):
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
