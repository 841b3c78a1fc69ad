"""detectron2 DefaultPredictor's contract on batches: RGB uint8 images in, detections in
original-image pixels out.

Each image is flipped to the model's channel order, resized so its short side is
MIN_SIZE_TEST (long side at most MAX_SIZE_TEST) with PIL's bilinear filter on uint8, run
through the model, and its boxes are scaled back and clipped to the original size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .boxes import clip_boxes, nonempty
from .checkpoint import load_weights
from .config import DetectorConfig, load_config
from .model import GeneralizedRCNN
from .structures import Detections
from .tiling import TilingOptions, predict_tiled

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def resized_shape(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """ResizeShortestEdge's output (h, w): short side to `short`, long side capped;
    MIN_SIZE_TEST 0 means no resizing."""
    if short == 0:
        return height, width
    scale = short * 1.0 / min(height, width)
    if height < width:
        new_h, new_w = short, scale * width
    else:
        new_h, new_w = scale * height, short
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


@dataclass
class PreparedImage:
    tensor: torch.Tensor  # (3, h, w) float32, model channel order, resized
    original_size: tuple[int, int]


class Predictor:
    """A loaded model plus DefaultPredictor's pre/postprocessing, for batches of images."""

    def __init__(
        self,
        model: GeneralizedRCNN,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        channels_last: bool | None = None,
    ) -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {sorted(PRECISIONS)}")
        on_cuda = self.device.type == "cuda"
        self.precision = precision
        self.autocast_dtype = PRECISIONS[precision] if on_cuda else None
        self.channels_last = on_cuda if channels_last is None else channels_last
        self.model = model.eval().to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.cfg: DetectorConfig = model.cfg
        # Measured: on CPU, batches beyond 2 images cost more per image; GPUs want them full.
        self.preferred_batch = 8 if on_cuda else 1

    @classmethod
    def from_files(
        cls,
        config: str | Path,
        weights: str | Path,
        overrides: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Predictor:
        """Build from a detectron2 config and checkpoint; `overrides` as detectron2's opts."""
        model = GeneralizedRCNN(load_config(config, overrides))
        load_weights(model, weights, for_inference=True)
        return cls(model, **kwargs)

    def sharing_weights(self, cfg: DetectorConfig) -> Predictor:
        """A predictor for a variant of this model's config (another TridentNet test branch,
        say) over these very weight tensors: no second copy in memory."""
        model = GeneralizedRCNN(cfg)
        model.load_state_dict(self.model.state_dict(), assign=True)
        return Predictor(model, self.device, self.precision, self.channels_last)

    def prepare(self, image: np.ndarray) -> PreparedImage:
        """RGB uint8 (H, W, 3) -> resized float tensor in the model's channel order."""
        height, width = image.shape[:2]
        if self.cfg.input_format == "BGR":
            image = image[:, :, ::-1]
        new_h, new_w = resized_shape(height, width, self.cfg.min_size_test, self.cfg.max_size_test)
        if (new_h, new_w) != (height, width):
            resized = Image.fromarray(np.ascontiguousarray(image)).resize(
                (new_w, new_h), Image.Resampling.BILINEAR
            )
            image = np.asarray(resized)
        tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32"))
        return PreparedImage(tensor, (height, width))

    def __call__(self, image: np.ndarray) -> Detections:
        return self.predict([image])[0]

    def detect(self, image: np.ndarray, tiling: TilingOptions | None) -> Detections:
        """One decoded image -> detections in its pixels; tiled unless `tiling` is None."""
        if tiling is None:
            return self(image)
        return predict_tiled(self.predict, image, tiling, self.preferred_batch)

    def predict(self, images: Sequence[np.ndarray]) -> list[Detections]:
        return self.predict_prepared([self.prepare(im) for im in images])

    @torch.inference_mode()
    def predict_prepared(self, prepared: Sequence[PreparedImage]) -> list[Detections]:
        """One batched forward pass; detections come back on the CPU in original pixels."""
        if not prepared:
            return []
        tensors = [p.tensor.to(self.device, non_blocking=True) for p in prepared]
        with self._autocast():
            if self.channels_last:
                tensors = [t.contiguous(memory_format=torch.channels_last) for t in tensors]
            outputs = self.model.inference(tensors)
        return [
            to_original_size(det, p.original_size).to("cpu")
            for det, p in zip(outputs, prepared, strict=True)
        ]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def to_original_size(det: Detections, original_size: tuple[int, int]) -> Detections:
    """Scale boxes from the resized input back to the original image, clip, drop empties."""
    height, width = original_size
    boxes = det.boxes.float().clone()
    boxes[:, 0::2] *= width / det.image_size[1]
    boxes[:, 1::2] *= height / det.image_size[0]
    boxes = clip_boxes(boxes, height, width)
    keep = nonempty(boxes)
    return Detections(boxes[keep], det.scores[keep].float(), det.classes[keep], original_size)
