"""`tridentloop bench --prelabel`: tiles per second of the whole survey batch job, decoding
included, against the bare engine on the same images already decoded (target: the job
within 80% of the engine). Images are generated drone frames, 6000x4000 JPEGs by default,
cut into 54 tiles of 800 px (15% overlap). The job runs as users run it, in a process of
its own (`python -m backend.cli prelabel`), once per `--decode` asked (JPEGs decoded by the
CPU workers, or on the device), optionally on a local Ray instance too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..detection.device import device_name, synchronize
from ..detection.tiling import TilePlan, TilingOptions
from ..imagery.images import load_image
from ..synthetic import survey_scene
from .workload import conditioned_model_dir


@dataclass(frozen=True)
class PrelabelBench:
    config: str = "tridentnet_fast_R_50_C4"
    images: int = 8
    height: int = 4000
    width: int = 6000
    tile_size: int = 800
    overlap: float = 0.15  # 9 x 6 = 54 tiles on a 6000 x 4000 frame
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int | None = None
    workers: int = 4
    ray: bool = False  # also run the job on a local Ray instance, 1 and 2 replicas
    # where the one-process job decodes its JPEGs (`prelabel --decode`), each a run of its own
    decodes: tuple[str, ...] = ("cpu",)


def _survey(root: Path, bench: PrelabelBench) -> list[Path]:
    """A few distinct frames, mirrored into more: JPEG decoding is real work per file."""
    rng = np.random.default_rng(0)
    unique = [
        survey_scene(rng, bench.height, bench.width, bench.height * bench.width // 80_000).image
        for _ in range(min(bench.images, 4))
    ]
    paths = []
    for i in range(bench.images):
        frame = unique[i % len(unique)]
        if (i // len(unique)) % 2:
            frame = frame[:, ::-1]
        path = root / f"frame{i:03d}.jpg"
        Image.fromarray(np.ascontiguousarray(frame)).save(path, quality=90)
        paths.append(path)
    return paths


def run_prelabel_benchmark(bench: PrelabelBench) -> Iterator[dict]:
    tiling = TilingOptions(bench.tile_size, bench.overlap, bench.batch_size)
    with tempfile.TemporaryDirectory(prefix="tridentloop-bench-") as tmp:
        root = Path(tmp)
        (root / "survey").mkdir()
        paths = _survey(root / "survey", bench)
        model = conditioned_model_dir(root / "model", bench.config)
        predictor = model.predictor(
            device=bench.device, precision=bench.precision, batch_size=bench.batch_size
        )
        images = [load_image(p) for p in paths]
        tiles = sum(len(TilePlan.for_image(*im.shape[:2], tiling).crops) for im in images)
        predictor.detect(images[0], tiling)  # warm-up (cuDNN autotuning, allocator)
        synchronize(predictor.device)
        start = time.perf_counter()
        for image in images:
            predictor.detect(image, tiling)
        synchronize(predictor.device)
        engine_rate = tiles / (time.perf_counter() - start)
        del images
        common = {
            "config": bench.config,
            "device": device_name(predictor.device),
            "precision": bench.precision,
            "batch": predictor.preferred_batch,
            "images": len(paths),
            "tiles_per_image": tiles / len(paths),
        }
        yield {"case": "prelabel", "runner": "engine", **common,
               "tiles_per_s": round(engine_rate, 2), "ratio_vs_engine": 1.0}
        del predictor
        runs = [*(("single", None, d) for d in bench.decodes),
                *([("ray", 1, "cpu"), ("ray", 2, "cpu")] if bench.ray else [])]
        for runner, replicas, decode in runs:
            report = _run_job(root, model.path, bench, replicas, decode,
                              f"{runner}{replicas or ''}-{decode}")
            rate = report["tiles"] / report["seconds"]
            yield {"case": "prelabel", "runner": runner, "replicas": replicas or 1,
                   "decode": decode, **common, "seconds": report["seconds"],
                   "failed": len(report["failed"]), "tiles_per_s": round(rate, 2),
                   "ratio_vs_engine": round(rate / engine_rate, 3)}


def _run_job(
    root: Path, model: Path, bench: PrelabelBench, replicas: int | None, decode: str, name: str
) -> dict:
    out = root / f"{name}.jsonl"
    command = [
        sys.executable, "-m", "backend.cli", "prelabel", "--images", str(root / "survey"),
        "--model", str(model), "--output", str(out), "--device", bench.device,
        "--precision", bench.precision, "--tile-size", str(bench.tile_size),
        "--tile-overlap", str(bench.overlap), "--workers", str(bench.workers),
        "--threads", str(torch.get_num_threads()), "--decode", decode,
    ]
    if bench.batch_size:
        command += ["--batch-size", str(bench.batch_size)]
    if replicas:
        command += ["--ray", "local", "--ray-workers", str(replicas)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.with_name(out.stem + ".report.json").read_text())
