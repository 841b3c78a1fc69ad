"""Plain containers passed between the engine's stages."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageBatch:
    """Normalised images padded into one tensor; `sizes` are each image's real (h, w)."""

    tensor: torch.Tensor
    sizes: list[tuple[int, int]]

    @staticmethod
    def from_images(
        images: list[torch.Tensor],
        size_divisibility: int,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> ImageBatch:
        """Pad to a common size (a multiple of `size_divisibility`, zeros to the right and
        bottom), as detectron2's ImageList does, in the memory format the network runs in."""
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        max_h = max(h for h, _ in sizes)
        max_w = max(w for _, w in sizes)
        if size_divisibility > 1:
            max_h = (max_h + size_divisibility - 1) // size_divisibility * size_divisibility
            max_w = (max_w + size_divisibility - 1) // size_divisibility * size_divisibility
        first = images[0]
        batch = torch.empty(
            (len(images), first.shape[0], max_h, max_w),
            dtype=first.dtype,
            device=first.device,
            memory_format=memory_format,
        ).zero_()
        for pad, im in zip(batch, images, strict=True):
            pad[:, : im.shape[-2], : im.shape[-1]].copy_(im)
        return ImageBatch(batch, sizes)


@dataclass
class Detections:
    """One image's detections: boxes (N, 4) x0 y0 x1 y1, scores (N,), classes (N,) int64."""

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    image_size: tuple[int, int] = field(default=(0, 0))

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def best_score(self) -> float:
        """The image's "animals present" score, which triage compares with its threshold
        (0 when nothing was detected at all)."""
        return float(self.scores.max()) if len(self) else 0.0

    def select(self, index: torch.Tensor) -> Detections:
        return Detections(
            self.boxes[index], self.scores[index], self.classes[index], self.image_size
        )

    def to(self, device: torch.device | str) -> Detections:
        return Detections(
            self.boxes.to(device), self.scores.to(device), self.classes.to(device), self.image_size
        )

    @staticmethod
    def cat(parts: list[Detections]) -> Detections:
        return Detections(
            torch.cat([p.boxes for p in parts]),
            torch.cat([p.scores for p in parts]),
            torch.cat([p.classes for p in parts]),
            parts[0].image_size,
        )

    @staticmethod
    def empty(image_size: tuple[int, int] = (0, 0)) -> Detections:
        return Detections(
            torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), image_size
        )


@dataclass
class Proposals:
    """Region proposals of a whole batch: boxes (P, 4) and the image each belongs to (P,),
    grouped by image in descending objectness."""

    boxes: torch.Tensor
    images: torch.Tensor

    def of_image(self, index: int) -> torch.Tensor:
        return self.boxes[self.images == index]


@dataclass
class BatchDetections:
    """A whole batch's detections as flat tensors, each row tagged with its image and rows
    grouped by image in descending score: a batch is post-processed by single tensor ops,
    with no per-image round trip to the host."""

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    images: torch.Tensor

    def select(self, index: torch.Tensor) -> BatchDetections:
        return BatchDetections(
            self.boxes[index], self.scores[index], self.classes[index], self.images[index]
        )

    def split(self, image_sizes: list[tuple[int, int]]) -> list[Detections]:
        """Per-image Detections (rows must be grouped by image)."""
        counts = torch.bincount(self.images, minlength=len(image_sizes)).tolist()
        parts = zip(
            self.boxes.split(counts),
            self.scores.split(counts),
            self.classes.split(counts),
            image_sizes,
            strict=True,
        )
        return [Detections(b, s, c, size) for b, s, c, size in parts]


@dataclass
class Targets:
    """Ground truth of one image for training: boxes (K, 4) in input pixels, classes (K,),
    and the seed of the image's own anchor and proposal sampling (None: torch's global
    RNG). With a seed, what an image samples does not depend on which images share its
    forward pass, so one process, several processes and any grouping train alike."""

    boxes: torch.Tensor
    classes: torch.Tensor
    seed: int | None = None

    def to(self, device: torch.device | str) -> Targets:
        return Targets(self.boxes.to(device), self.classes.to(device), self.seed)

    def reseeded(self, stream: int) -> Targets:
        """The same boxes drawing from another stream (a trident branch's copy)."""
        return self if self.seed is None else Targets(
            self.boxes, self.classes, (self.seed * 1_000_003 + stream) % 2**63
        )

    def generator(self, stream: int) -> torch.Generator | None:
        """The image's draws for one sampler (0: RPN anchors, 1: ROI proposals)."""
        if self.seed is None:
            return None
        return torch.Generator().manual_seed((self.seed * 1_000_003 + stream) % 2**63 + 1)
