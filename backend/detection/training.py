"""Fine-tuning steps: random crops with flips, scale and colour jitter, fed to the model's
detectron2 losses with SGD, warmup and (on CUDA) mixed precision.

The crops match how the model will run (its recipe): tile-sized at native resolution for a
tiled model, the whole image resized as DefaultPredictor resizes it for a whole-image
model, so the model learns objects at the scale it will see them. The DVC `train` stage
adds checkpoints, metrics and multi-GPU on top.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .device import training_dtype
from .model import GeneralizedRCNN
from .predictor import resized_shape
from .structures import Targets

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One training image: (H, W, 3) uint8 RGB with boxes (K, 4) and class ids (K,)."""

    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray


@dataclass(frozen=True)
class TrainOptions:
    iterations: int = 300
    batch_size: int = 2
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 50
    crop_size: int = 320
    # (MIN_SIZE, MAX_SIZE): whole images resized as at inference instead of crops
    whole_image: tuple[int, int] | None = None
    scale_jitter: tuple[float, float] = (0.8, 1.25)
    colour_jitter: float = 0.2
    min_visible: float = 0.6  # a box cut by the crop is kept if this much of it remains
    # share of crops placed around a labelled object, in an image holding one: a survey's
    # frames are mostly empty ground, and crops drawn anywhere would rarely show an animal
    object_crops: float = 0.0
    clip_grad_norm: float = 10.0
    precision: str = "auto"  # auto: fp16 AMP on CUDA, fp32 on CPU; or fp32, fp16, bf16
    seed: int = 0
    checkpoint_period: int = 0  # iterations between checkpoints; 0: only at the end
    workers: int = 2  # processes that decode and crop ahead of the model; 0: in this one

    def __post_init__(self) -> None:
        if not 0.0 <= self.object_crops <= 1.0:
            raise ValueError(f"train.object_crops is a share of the crops, between 0 and 1; "
                             f"got {self.object_crops}")


def random_crop(sample: Sample, rng: np.random.Generator, options: TrainOptions,
                around_object: bool = False) -> Sample:
    """A crop_size window (whole image if smaller; the whole image, resized, with
    `whole_image`) after scale jitter, maybe flipped, with brightness/contrast jitter;
    boxes clipped, mostly-cut ones dropped. The window is cut from the original and only
    it is resized: a 6000 x 4000 frame is never resized whole for one 800 px crop.
    `around_object`: the window holds one of the sample's boxes, drawn at random."""
    image, boxes = sample.image, sample.boxes.astype(np.float32)
    height, width = image.shape[:2]
    scale = float(rng.uniform(*options.scale_jitter))
    if options.whole_image is not None:
        scale *= resized_shape(height, width, *options.whole_image)[0] / height
    scaled_h, scaled_w = max(1, round(height * scale)), max(1, round(width * scale))
    crop_size = options.crop_size if options.whole_image is None else max(scaled_h, scaled_w)
    ch, cw = min(crop_size, scaled_h), min(crop_size, scaled_w)
    if around_object and len(boxes):
        x0, y0 = _window_around(boxes[int(rng.integers(len(boxes)))] * scale, rng,
                                (cw, ch), (scaled_w, scaled_h))
    else:
        y0 = int(rng.integers(0, scaled_h - ch + 1))
        x0 = int(rng.integers(0, scaled_w - cw + 1))
    oy0, ox0 = int(y0 * height / scaled_h), int(x0 * width / scaled_w)
    oy1 = min(height, max(oy0 + 1, math.ceil((y0 + ch) * height / scaled_h)))
    ox1 = min(width, max(ox0 + 1, math.ceil((x0 + cw) * width / scaled_w)))
    image = image[oy0:oy1, ox0:ox1]
    if image.shape[:2] != (ch, cw):
        image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(
            (cw, ch), Image.Resampling.BILINEAR))
    fx, fy = cw / (ox1 - ox0), ch / (oy1 - oy0)
    shifted = (boxes - np.array([ox0, oy0, ox0, oy0], dtype=np.float32)) * np.array(
        [fx, fy, fx, fy], dtype=np.float32)
    clipped = np.clip(shifted, 0, [cw, ch, cw, ch]).astype(np.float32)
    area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # noqa: E731
    visible = area(clipped) >= options.min_visible * np.maximum(area(shifted), 1e-6)
    clipped, classes = clipped[visible], sample.classes[visible]
    if rng.random() < 0.5:
        image = image[:, ::-1]
        clipped = np.stack(
            [cw - clipped[:, 2], clipped[:, 1], cw - clipped[:, 0], clipped[:, 3]], axis=1
        ).reshape(-1, 4)
    if options.colour_jitter > 0:
        gain = 1 + rng.uniform(-options.colour_jitter, options.colour_jitter)
        bias = rng.uniform(-options.colour_jitter, options.colour_jitter) * 64
        image = np.clip(image.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)
    return Sample(np.ascontiguousarray(image), clipped, classes)


def _window_around(box: np.ndarray, rng: np.random.Generator, window: tuple[int, int],
                   image: tuple[int, int]) -> tuple[int, int]:
    """A window's top-left corner (x, y), drawn uniformly among those holding `box` whole
    (or, for a box larger than the window, among those inside it) and inside the image."""
    corner = []
    for start, end, size, total in zip(box[:2], box[2:], window, image, strict=True):
        low, high = sorted((math.ceil(end) - size, math.floor(start)))
        low, high = max(0, low), min(total - size, high)
        corner.append(int(rng.integers(low, high + 1)) if low <= high
                      else int(rng.integers(0, total - size + 1)))
    return corner[0], corner[1]


def objects_per_sample(samples: Sequence[Sample]) -> np.ndarray:
    """Boxes per sample, read without decoding images where the samples keep their boxes
    apart (pipelines' StreamedSamples)."""
    boxes = getattr(samples, "boxes", None)
    counts = [len(b) for b in (boxes if boxes is not None else (s.boxes for s in samples))]
    return np.array(counts, int)


def to_model_input(sample: Sample, input_format: str) -> tuple[torch.Tensor, Targets]:
    image = sample.image[:, :, ::-1] if input_format == "BGR" else sample.image
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32))
    return tensor, Targets(
        torch.from_numpy(sample.boxes).float(), torch.from_numpy(sample.classes).long()
    )


def init_from_scratch(model: GeneralizedRCNN) -> None:
    """Without pretrained weights, FrozenBN cannot normalise: start every residual branch at
    zero (conv3) so that a deep ResNet trains stably from random weights."""
    for name, module in model.named_modules():
        if name.endswith("conv3") and isinstance(module, nn.Conv2d):
            nn.init.zeros_(module.weight)


def make_optimizer(model: nn.Module, options: TrainOptions) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(
        params, lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay
    )


def lr_at(iteration: int, options: TrainOptions) -> float:
    """Linear warmup, then cosine decay to 1% of the base rate."""
    if iteration < options.warmup_iters:
        return options.lr * (0.001 + 0.999 * iteration / options.warmup_iters)
    progress = (iteration - options.warmup_iters) / max(
        1, options.iterations - options.warmup_iters
    )
    return options.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


StepCallback = Callable[[int, dict[str, float]], None]
CheckpointCallback = Callable[[int, torch.optim.Optimizer, torch.amp.GradScaler], None]


def _seed(*parts: int) -> int:
    """A seed for one image of one step: the same wherever and whenever it runs."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class _Crop:
    iteration: int
    image: torch.Tensor
    target: Targets


class StepCrops(torch.utils.data.Dataset):
    """Item n of a run is one image of one step, in order: step `start + n // len(positions)`,
    batch position `positions[n % len(positions)]` (this process's share of the batch). The
    image, its crop and its sampling seed come from seeds of (seed, step, position), so it
    is the same item whichever process or worker makes it, and whenever; `samples` may
    decode lazily, here, in a DataLoader worker."""

    def __init__(self, samples: Sequence[Sample], options: TrainOptions, positions: list[int],
                 start: int, input_format: str) -> None:
        self.samples, self.options, self.positions = samples, options, positions
        self.start, self.input_format = start, input_format
        self.holding = (np.flatnonzero(objects_per_sample(samples)) if options.object_crops
                        else np.zeros(0, int))

    def __len__(self) -> int:
        return (self.options.iterations - self.start) * len(self.positions)

    def __getitem__(self, n: int) -> _Crop:
        options = self.options
        iteration = self.start + n // len(self.positions)
        k = self.positions[n % len(self.positions)]
        pick = np.random.default_rng([options.seed, iteration]).integers(
            len(self.samples), size=options.batch_size)[k]
        around = False
        if len(self.holding):  # an object crop: its image and whether, from their own seeds
            draw = np.random.default_rng([options.seed, iteration, k, 1])
            around = bool(draw.random() < options.object_crops)
            pick = self.holding[draw.integers(len(self.holding))] if around else pick
        crop = random_crop(self.samples[int(pick)],
                           np.random.default_rng([options.seed, iteration, k]), options, around)
        image, target = to_model_input(crop, self.input_format)
        target.seed = _seed(options.seed, iteration, k)
        return _Crop(iteration, image, target)


def _same_shape(crops: list[_Crop]) -> list[list[_Crop]]:
    """Crops grouped by shape, in order of appearance: a forward pass never pads one crop to
    another's size (which would change its features near the edge)."""
    groups: dict[tuple[int, ...], list[_Crop]] = {}
    for crop in crops:
        groups.setdefault(tuple(crop.image.shape), []).append(crop)
    return list(groups.values())


def _backward(model: nn.Module, crops: list[_Crop], scaler: torch.amp.GradScaler,
              dtype: torch.dtype | None, iteration: int) -> dict[str, float]:
    """One step's gradients, the crops of one shape in one forward pass each, weighted by
    their share of the step (DDP syncs once, after the last); the step's mean losses."""
    device = getattr(model, "module", model).device
    logged: dict[str, float] = {}
    groups = _same_shape(crops)
    for n, group in enumerate(groups):
        last = n == len(groups) - 1
        sync = (contextlib.nullcontext() if last or not hasattr(model, "no_sync")
                else model.no_sync())
        share = len(group) / len(crops)
        with sync:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                losses = model([c.image for c in group], [c.target for c in group])
                total = sum(losses.values())
            if not torch.isfinite(total):
                raise FloatingPointError(
                    f"loss became {total.item()} at iteration {iteration}: "
                    f"{ {k: v.item() for k, v in losses.items()} }"
                )
            scaler.scale(total * share).backward()
        for key, value in (("total_loss", total), *losses.items()):
            logged[key] = logged.get(key, 0.0) + value.item() * share
    return logged


def train(
    model: nn.Module,
    samples: Sequence[Sample],
    options: TrainOptions,
    start_iteration: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    on_step: StepCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    rank: int = 0,
    world_size: int = 1,
    scaler_state: dict[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """Run iterations [start_iteration, options.iterations).

    A DataLoader's `options.workers` processes decode and crop each step's images while the
    model trains on the previous step's; the crops of one shape go through one forward pass.
    Every image draws its crop and its anchor/proposal sampling from seeds of (seed, step,
    position in the batch), and the detectron2 losses are means over images that sample
    equal counts, so a resumed run equals an uninterrupted one, and N
    DistributedDataParallel processes (`model` wrapped, each taking every N-th image) equal
    one process. With fp16 the loss scaler's state is part of a checkpoint (`scaler_state`
    resumes it).
    """
    if not samples:
        raise ValueError("no training samples")
    if options.batch_size % world_size:
        raise ValueError(
            f"batch size {options.batch_size} must divide by the {world_size} processes"
        )
    core: GeneralizedRCNN = getattr(model, "module", model)
    model.train()
    optimizer = optimizer or make_optimizer(core, options)
    device = core.device
    dtype = training_dtype(options.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if scaler_state:
        scaler.load_state_dict(scaler_state)
    mine = list(range(rank, options.batch_size, world_size))
    steps = torch.utils.data.DataLoader(
        StepCrops(samples, options, mine, start_iteration, core.cfg.input_format),
        batch_size=len(mine), collate_fn=list, num_workers=options.workers,
        prefetch_factor=2 if options.workers else None,
    )
    for crops in steps:
        iteration = crops[0].iteration
        for group in optimizer.param_groups:
            group["lr"] = lr_at(iteration, options)
        optimizer.zero_grad(set_to_none=True)
        logged = _backward(model, crops, scaler, dtype, iteration)
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(core.parameters(), options.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        if on_step is not None:
            on_step(iteration, logged)
        done = iteration + 1
        if on_checkpoint is not None and (
            done == options.iterations
            or (options.checkpoint_period and done % options.checkpoint_period == 0)
        ):
            on_checkpoint(done, optimizer, scaler)
    model.eval()
    return optimizer
