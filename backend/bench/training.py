"""`tridentloop bench --training`: training images per second of our training step beside
torchvision's Faster R-CNN R50-FPN training step, in the same process, on the same 800 px
survey tiles and precision; and whether a few steps of ours keep the loss finite and
falling (mixed precision included).

detectron2's model zoo trains R50-C4 at about 3.6 images/s per V100; the target on an H100
is at least 10.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..detection.device import device_name, resolve_device, synchronize, training_dtype
from ..detection.training import Sample, TrainOptions, train
from ..synthetic import survey_scene
from .workload import conditioned_model


@dataclass(frozen=True)
class TrainingBench:
    config: str = "tridentnet_fast_R_50_C4"
    batch_size: int = 8
    iterations: int = 6  # timed after `warmup` iterations
    warmup: int = 2
    crop_size: int = 800
    device: str = "auto"
    precision: str = "auto"  # fp16 AMP on CUDA, fp32 on CPU
    baseline: bool = True


def _samples(count: int, size: int) -> list[Sample]:
    rng = np.random.default_rng(0)
    scenes = [survey_scene(rng, size, size, 30) for _ in range(count)]
    return [Sample(s.image, s.boxes, s.classes) for s in scenes]


def run_training_benchmark(bench: TrainingBench) -> Iterator[dict]:
    device = resolve_device(bench.device)
    samples = _samples(bench.batch_size, bench.crop_size)
    model = conditioned_model(bench.config, {"MODEL.ROI_HEADS.NUM_CLASSES": 3}).to(device)
    options = TrainOptions(
        iterations=bench.warmup + bench.iterations,
        batch_size=bench.batch_size,
        lr=0.005,
        warmup_iters=bench.warmup + bench.iterations,
        crop_size=bench.crop_size,
        scale_jitter=(1.0, 1.0),
        precision=bench.precision,
    )
    stamps: list[float] = []
    losses: list[float] = []

    def on_step(_iteration: int, logged: dict[str, float]) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())
        losses.append(logged["total_loss"])

    synchronize(device)
    start = time.perf_counter()
    train(model, samples, options, on_step=on_step)
    timed = stamps[-1] - stamps[bench.warmup - 1] if bench.warmup else stamps[-1] - start
    rate = bench.iterations * bench.batch_size / timed
    record = {
        "case": f"training:{bench.config}",
        "device": device_name(device),
        "precision": bench.precision,
        "batch": bench.batch_size,
        "images_per_s": round(rate, 2),
        "losses": [round(v, 4) for v in losses],
        "loss_finite": bool(np.isfinite(losses).all()),
        "loss_falling": bool(np.mean(losses[-2:]) < np.mean(losses[:2])),
    }
    del model
    if bench.baseline:
        theirs = _torchvision_rate(samples, bench, device)
        record["torchvision_frcnn_r50_fpn_images_per_s"] = round(theirs, 2)
        record["ratio_vs_torchvision"] = round(rate / theirs, 3)
    yield record


def _torchvision_rate(samples: list[Sample], bench: TrainingBench, device: torch.device) -> float:
    """torchvision's own training step: the whole batch in one forward pass, AMP as ours."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4)
    model.to(device).train()
    dtype = training_dtype(bench.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005,
                                momentum=0.9)
    images = [torch.from_numpy(s.image).permute(2, 0, 1).float().div(255).to(device)
              for s in samples]
    targets = [{"boxes": torch.from_numpy(s.boxes).float().to(device),
                "labels": torch.from_numpy(s.classes).long().add(1).to(device)} for s in samples]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = sum(model(images, targets).values())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(bench.warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(bench.iterations):
        step()
    synchronize(device)
    return bench.iterations * bench.batch_size / (time.perf_counter() - start)
