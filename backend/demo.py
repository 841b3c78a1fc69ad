"""`tridentloop demo` (`make demo`): the main job on an embedded default, with no GPU and no
downloads. It generates survey-like images, trains a tiny TridentNet from scratch, saves it
as a model directory, pre-labels large survey images with tiled inference (JSON Lines + PNG
overlays) and scores the pre-labels against the generated ground truth.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .detection.boxes import pairwise_iou
from .detection.config import bundled_config, dump_config, load_config
from .detection.model import GeneralizedRCNN
from .detection.predictor import resolve_device
from .detection.tiling import TilingOptions
from .detection.training import Sample, TrainOptions, init_from_scratch, train
from .model_dir import ModelDir, write_model_dir
from .predict import run_predict
from .synthetic import CLASSES, Scene, survey_scene

DEMO_CONFIG = "tiny_tridentnet"
TILE = 320  # the tiny model's MIN_SIZE_TEST: tiles run at native resolution


def match_counts(
    gt: np.ndarray, gt_classes: np.ndarray, pred: list[dict], iou: float = 0.5
) -> tuple[int, int]:
    """(true positives, predictions): greedy one-to-one matching by score, same class."""
    taken = np.zeros(len(gt), bool)
    hits = 0
    for det in sorted(pred, key=lambda d: -d["score"]):
        if not len(gt):
            break
        overlaps = pairwise_iou(torch.tensor([det["box"]]), torch.from_numpy(gt))[0].numpy()
        overlaps[taken | (gt_classes != det["class_id"])] = 0
        best = int(overlaps.argmax())
        if overlaps[best] >= iou:
            taken[best] = True
            hits += 1
    return hits, len(pred)


def _train_model(out: Path, iterations: int, seed: int, device: str) -> ModelDir:
    rng = np.random.default_rng(seed)
    scenes = [survey_scene(rng, 480, 480, 10) for _ in range(16)]
    torch.manual_seed(seed)
    config_path = bundled_config(DEMO_CONFIG)
    model = GeneralizedRCNN(load_config(config_path))
    init_from_scratch(model)
    model.to(resolve_device(device))
    options = TrainOptions(
        iterations=iterations, crop_size=TILE, lr=0.01, warmup_iters=30, seed=seed
    )
    bar = tqdm(total=iterations, desc="train", unit="it")

    def report(iteration: int, losses: dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{losses['total_loss']:.3f}")

    started = time.perf_counter()
    train(model, [Sample(s.image, s.boxes, s.classes) for s in scenes], options, on_step=report)
    bar.close()
    metadata = {
        "version": "demo-v1",
        "trained_iterations": iterations,
        "seed": seed,
        "train_seconds": round(time.perf_counter() - started, 1),
        "base": "from scratch",
        "config": DEMO_CONFIG,
    }
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    return write_model_dir(out / "model", dump_config(config_path), state, list(CLASSES), metadata)


def _write_survey(out: Path, seed: int) -> list[tuple[Path, Scene]]:
    rng = np.random.default_rng(seed + 1000)
    survey = []
    for i in range(3):
        scene = survey_scene(rng, 1200, 1600, 40)
        path = out / "survey" / f"survey_{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(path)
        survey.append((path, scene))
    return survey


def run_demo(args: argparse.Namespace) -> int:
    out: Path = args.output
    if (out / "model").exists():
        raise ValueError(f"{out} holds an earlier demo; remove it or pass --output elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    print(f"tridentloop demo -> {out}/ (CPU is fine: a tiny TridentNet, 320 px tiles)")
    model_dir = _train_model(out, args.iterations, args.seed, args.device)
    survey = _write_survey(out, args.seed)
    predictor = model_dir.predictor(device=args.device, precision=args.precision)
    tiling = TilingOptions(tile_size=TILE, overlap=0.2)
    with (out / "predictions.jsonl").open("w") as jsonl:
        run_predict(
            [str(p) for p, _ in survey],
            predictor,
            jsonl,
            tiling,
            model_dir.labels,
            overlays=out / "overlays",
        )
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    print(
        f"\n{'image':<16}{'size':>11}{'animals':>9}{'pre-labels':>12}{'recall':>8}{'precision':>11}"
    )
    totals = np.zeros(3, int)
    for (path, scene), record in zip(survey, records, strict=True):
        hits, count = match_counts(scene.boxes, scene.classes, record["detections"])
        totals += (hits, count, len(scene.boxes))
        print(
            f"{path.name:<16}{record['width']:>5}x{record['height']:<5}{len(scene.boxes):>9}"
            f"{count:>12}{hits / max(1, len(scene.boxes)):>8.2f}{hits / max(1, count):>11.2f}"
        )
    summary = {
        "model_version": model_dir.version,
        "images": len(records),
        "animals": int(totals[2]),
        "pre_labels": int(totals[1]),
        "recall": round(totals[0] / max(1, totals[2]), 3),
        "precision": round(totals[0] / max(1, totals[1]), 3),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\npre-labels: {out / 'predictions.jsonl'}; overlays: {out / 'overlays'}/")
    print(json.dumps(summary))
    return 0
