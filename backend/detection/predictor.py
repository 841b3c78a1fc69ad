"""detectron2 DefaultPredictor's contract on batches: RGB uint8 images in, detections in
original-image pixels out.

Each image is flipped to the model's channel order and resized so its short side is
MIN_SIZE_TEST (long side at most MAX_SIZE_TEST) with PIL's bilinear filter on uint8, on the
CPU threads that prepare images. It crosses to the device still uint8 (a quarter of
float's bytes, from pinned memory when asked) and becomes float there. A batch runs as one
forward pass, its detections are scaled back and clipped to each original size by single
tensor ops, and they come back to the host in one copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2.functional import resize

from .boxes import clip_boxes, nonempty
from .checkpoint import load_weights
from .config import DetectorConfig, load_config
from .device import DeviceOptions
from .layers import set_norms_folded, share_folded_norms
from .model import GeneralizedRCNN
from .structures import BatchDetections, Detections
from .tiling import TilingOptions, predict_tiled
from .views import FLIPS, checked_views, fuse, mirrored, unmirrored


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
    tensor: torch.Tensor  # (h, w, 3) uint8 RGB, resized; pinned if asked
    original_size: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        """The network input's (h, w): prepared images of one shape batch without padding."""
        return int(self.tensor.shape[0]), int(self.tensor.shape[1])


class Predictor:
    """A loaded model plus DefaultPredictor's pre/postprocessing, for batches of images."""

    def __init__(
        self,
        model: GeneralizedRCNN,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        channels_last: bool | None = None,
        pin_memory: bool | None = None,
        batch_size: int | None = None,
        views: int = 1,
        **engine: Any,
    ) -> None:
        """`views`: 1, or 2 or 4 mirrored views of each image with their boxes fused
        (detection/views.py; a model's recipe says which). `engine`: DeviceOptions'
        `roi_budget_mb`, `nms`, `roi_align`, `fold_norms`, `compile`."""
        self.views = checked_views(views)
        self.options = DeviceOptions.create(
            device, precision, channels_last, pin_memory, batch_size, **engine
        )
        self.options.apply_backend_flags()
        self.model = model.eval().to(self.device, memory_format=self.options.memory_format)
        self.model.configure_inference(
            self.options.nms, self.options.roi_budget_mb * 2**20, self.options.roi_align
        )
        set_norms_folded(self.model, self.options.fold_norms)
        if self.options.compile is not None:
            self.model.compile_fixed_parts(self.options.compile)
        self.cfg: DetectorConfig = model.cfg

    @property
    def device(self) -> torch.device:
        return self.options.device

    @property
    def preferred_batch(self) -> int:
        return self.options.batch_size

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
        share_folded_norms(self.model, model)
        return Predictor(model, views=self.views, **self.options.settings())

    def prepare(self, image: np.ndarray | torch.Tensor) -> PreparedImage:
        """RGB uint8 (H, W, 3) -> resized uint8 tensor ready to cross to the device (CPU
        work: call it from the threads that decode images). The channels stay RGB here: a
        BGR model's channels are swapped on the device, where it costs nothing, and not by
        numpy, whose strided copy costs ~5 ms per 800x800 tile (measured)."""
        if isinstance(image, torch.Tensor):
            return _prepare_decoded(image, self.cfg)
        height, width = image.shape[:2]
        new_h, new_w = resized_shape(height, width, self.cfg.min_size_test, self.cfg.max_size_test)
        if (new_h, new_w) != (height, width):
            resized = Image.fromarray(np.ascontiguousarray(image)).resize(
                (new_w, new_h), Image.Resampling.BILINEAR
            )
            image = np.asarray(resized)
        tensor = torch.from_numpy(np.require(image, requirements=("C", "W")))
        return PreparedImage(self.options.to_host_staging(tensor), (height, width))

    def __call__(self, image: np.ndarray) -> Detections:
        return self.predict([image])[0]

    def detect(self, image: np.ndarray, tiling: TilingOptions | None) -> Detections:
        """One decoded image -> detections in its pixels; tiled unless `tiling` is None."""
        if tiling is None:
            return self(image)
        return predict_tiled(self.predict, image, tiling, self.preferred_batch)

    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> torch.Tensor:
        """The whole image at the model's test size as one unit vector (`model.embed`)."""
        with self.options.autocast():
            batch = self.model.preprocess(self._on_device([self.prepare(image)]),
                                          self.options.memory_format)
            return self.model.embed(batch)[0].float().cpu()

    def _on_device(self, prepared: Sequence[PreparedImage]) -> list[torch.Tensor]:
        """Prepared images on the device, (C, H, W) in the model's channel order."""
        tensors = [self.options.to_device(p.tensor).permute(2, 0, 1) for p in prepared]
        if self.cfg.input_format == "BGR":
            tensors = [t.flip(0) for t in tensors]
        return tensors

    def predict(self, images: Sequence[np.ndarray]) -> list[Detections]:
        return self.predict_prepared([self.prepare(im) for im in images])

    @torch.inference_mode()
    def predict_prepared(self, prepared: Sequence[PreparedImage]) -> list[Detections]:
        """Detections in original pixels, on the CPU. With several `views`, the mirrored
        views run only for the images where the first found something: most tiles of a
        survey are empty ground, and there the other views cost nothing."""
        found = self._forward(prepared)
        if self.views == 1:
            return found
        busy = [i for i, d in enumerate(found) if len(d)]
        if not busy:
            return found
        seen = {i: [found[i]] for i in busy}
        for left_right, up_down in FLIPS[1 : self.views]:
            flipped = [PreparedImage(mirrored(prepared[i].tensor, left_right, up_down),
                                     prepared[i].original_size) for i in busy]
            for i, det in zip(busy, self._forward(flipped), strict=True):
                seen[i].append(unmirrored(det, prepared[i].original_size, left_right, up_down))
        limit = self.cfg.roi_heads.detections_per_image
        return [fuse(seen[i], limit) if i in seen else d for i, d in enumerate(found)]

    def _forward(self, prepared: Sequence[PreparedImage]) -> list[Detections]:
        """One batched forward pass (images of different shapes are zero-padded to a common
        one, as detectron2 batches them); detections come back on the CPU in original
        pixels, in one device-to-host copy."""
        if not prepared:
            return []
        options = self.options
        with options.autocast():
            batch = self.model.preprocess(self._on_device(prepared), options.memory_format)
            found = self.model.detect(batch)
        return to_original_sizes(found, batch.sizes, [p.original_size for p in prepared])


def _prepare_decoded(image: torch.Tensor, cfg: DetectorConfig) -> PreparedImage:
    """A crop of an image decoded where the model runs (`imagery.device_jpeg`) stays there:
    resized, if at all, by torchvision's antialiased bilinear filter, which follows PIL's to
    a level or two, not bit for bit."""
    height, width = image.shape[:2]
    new_size = resized_shape(height, width, cfg.min_size_test, cfg.max_size_test)
    if new_size != (height, width):
        image = resize(image.permute(2, 0, 1), list(new_size), antialias=True).permute(1, 2, 0)
    return PreparedImage(image.contiguous(), (height, width))


def to_original_sizes(
    found: BatchDetections,
    input_sizes: list[tuple[int, int]],
    original_sizes: list[tuple[int, int]],
) -> list[Detections]:
    """Scale each image's boxes from its network input back to its original size, clip,
    bring the batch to the host in one copy, drop empty boxes, split per image."""
    device = found.boxes.device
    pairs = zip(input_sizes, original_sizes, strict=True)
    scale = torch.tensor(
        [[ow / iw, oh / ih] for (ih, iw), (oh, ow) in pairs], dtype=torch.float32, device=device
    )[found.images]
    bounds = torch.tensor(original_sizes, dtype=torch.float32, device=device)[found.images]
    boxes = found.boxes.float() * scale.repeat(1, 2)
    boxes = clip_boxes(boxes, bounds[:, 0], bounds[:, 1])
    packed = torch.cat(
        [boxes, found.scores.float()[:, None], found.classes[:, None].float(),
         found.images[:, None].float()],
        dim=1,
    ).cpu()
    host = BatchDetections(
        packed[:, :4], packed[:, 4], packed[:, 5].long(), packed[:, 6].long()
    )
    return host.select(nonempty(host.boxes)).split(original_sizes)
