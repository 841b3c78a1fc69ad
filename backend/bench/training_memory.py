"""`tridentloop bench --training-memory`: the loop's `train` stage (`python -m
pipelines.train`, as `dvc repro` runs it) on N generated 6000 x 4000 JPEG frames (default
300: 21.6 GB decoded), with the peak memory of the stage and its DataLoader workers
(proportional set size: pages they share counted once). Images are decoded when a step
needs them, in the workers, and cropped before any resize: memory follows workers x batch,
not the dataset (target: under 4 GB on CPU).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from ..synthetic import coco_of, survey_scene
from .timing import run_measured

_UNIQUE = 4  # distinct frames, copied to N files: decoding is real work per file


@dataclass(frozen=True)
class TrainingMemoryBench:
    images: int = 300
    height: int = 4000
    width: int = 6000
    iterations: int = 12
    batch_size: int = 2
    workers: int = 2
    tile_size: int = 800
    config: str = "tiny_tridentnet"
    device: str = "auto"


def _dataset(root: Path, bench: TrainingMemoryBench) -> dict:
    """Frames as JPEG files and their boxes as a COCO train split."""
    rng = np.random.default_rng(0)
    images = root / "data/dataset/images"
    images.mkdir(parents=True)
    scenes = []
    for i in range(_UNIQUE):
        scene = survey_scene(rng, bench.height, bench.width, bench.height * bench.width // 80_000)
        Image.fromarray(scene.image).save(images / f"frame{i:04d}.jpg", quality=90)
        scenes.append(scene)
    for i in range(_UNIQUE, bench.images):
        shutil.copyfile(images / f"frame{i % _UNIQUE:04d}.jpg", images / f"frame{i:04d}.jpg")
    return coco_of([(f"frame{i:04d}.jpg", scenes[i % _UNIQUE].boxes,
                     scenes[i % _UNIQUE].classes, (bench.height, bench.width))
                    for i in range(bench.images)])


def run_training_memory_benchmark(bench: TrainingMemoryBench) -> Iterator[dict]:
    with tempfile.TemporaryDirectory(prefix="tridentloop-train-memory-") as tmp:
        root = Path(tmp)
        coco = _dataset(root, bench)
        (root / "data/split").mkdir(parents=True)
        (root / "data/split/train.json").write_text(json.dumps(coco))
        (root / "params.yaml").write_text(yaml.safe_dump({
            "recipe": {"mode": "tiled", "tile_size": bench.tile_size},
            "train": {"config": bench.config, "iterations": bench.iterations,
                      "batch_size": bench.batch_size, "workers": bench.workers,
                      "warmup_iters": 2, "device": bench.device, "checkpoint_period": 0},
            "deploy": {"snapshot": str(root / "deployed.json")},
        }))
        (root / "deployed.json").write_text(json.dumps(
            {"version": None, "why_none": "the benchmark trains from random weights"}))
        stage = run_measured([sys.executable, "-m", "pipelines.train"], "the train stage", root)
        yield {"case": "training-memory", "images": bench.images,
               "image_size": f"{bench.width}x{bench.height}",
               "decoded_dataset_gb": round(bench.images * bench.height * bench.width * 3 / 1e9, 1),
               "iterations": bench.iterations, "batch": bench.batch_size,
               "workers": bench.workers, "crop": bench.tile_size,
               "seconds": round(stage.seconds, 1),
               "peak_pss_mb": round(stage.tree_peak_pss_mb), "stage_process_peak_rss_mb":
               round(stage.peak_rss_mb), "target_peak_mb": 4096,
               "within_target": stage.tree_peak_pss_mb < 4096}
