"""Greedy non-maximum suppression for a whole batch at once, exactly as torchvision's
kernel decides it, in tensor ops that run on any device.

torchvision keeps boxes one at a time: its CUDA kernel finishes with a single-block serial
pass (~0.4 us per box; one launch per image and per NMS, 2 ms per 800x800 tile measured on
an H200), and `batched_nms` loops over groups with a host round trip each. Greedy NMS has a
property that needs no such loop: box j is kept exactly when no *kept* box before it (in
score order, same group) overlaps it above the threshold. That rule has one fixed point,
reached by applying it to the whole set at once, again and again: after k rounds the first
k boxes are final, and in practice a round or a few settle a block, since suppression
chains are short. Boxes are processed in blocks of score order per image, all images side
by side, and each image stops once it has its `topk` boxes (`POST_NMS_TOPK_TEST`,
`DETECTIONS_PER_IMAGE`): boxes after those cannot change them.

Exactness: the IoU is computed with the kernel's arithmetic (areas from raw coordinates,
`inter / (area_i + area_j - inter)` in fp32) and compared strictly above the threshold as
the CPU kernel does (a float32 IoU against the double threshold). torchvision's CUDA kernel
compares against the threshold rounded to float32, which differs only when the IoU equals
that rounded value and the rounding went up (0.3, 0.6; not detectron2's 0.5 and 0.7). Ties
in score keep the lower index first (stable order).
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 1024  # boxes per image settled together: a (images, 1024, 1024) overlap matrix


def strict_threshold(threshold: float) -> float:
    """The float32 value t32 such that, for any float32 IoU x, `x > t32` exactly when
    x > threshold in real arithmetic (the CPU kernel's float-vs-double comparison)."""
    t32 = np.float32(threshold)
    if float(t32) > threshold:
        t32 = np.nextafter(t32, np.float32(-np.inf))
    return float(t32)


def _overlaps(
    a: torch.Tensor, area_a: torch.Tensor, b: torch.Tensor, area_b: torch.Tensor, t32: float
) -> torch.Tensor:
    """(I, m, n): IoU(a_i, b_j) > threshold, with `a` the earlier boxes (I, m, 4) and `b` the
    later ones (I, n, 4), in the kernel's order of operations."""
    a, b = a[:, :, None, :], b[:, None, :, :]
    w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_(min=0)
    h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_(min=0)
    inter = w * h
    return inter / (area_a[:, :, None] + area_b[:, None, :] - inter) > t32


def _settle(alive: torch.Tensor, suppresses: torch.Tensor) -> torch.Tensor:
    """The greedy keep mask of one block: the fixed point of "alive and not suppressed by a
    kept box before it". `suppresses[:, i, j]` is True where box i would remove box j (i < j)."""
    keep = alive
    while True:
        hit = (keep[:, :, None] & suppresses).any(dim=1)
        settled = alive & ~hit
        if torch.equal(settled, keep):
            return keep
        keep = settled


def _by_image_then_score(scores: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Indices ordered by image, then descending score, then ascending index."""
    by_score = torch.sort(scores, descending=True, stable=True).indices
    return by_score[torch.sort(images[by_score], stable=True).indices]


def batched_greedy_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    groups: torch.Tensor,
    images: torch.Tensor,
    iou_threshold: float,
    topk: int = -1,
    block: int = BLOCK,
) -> torch.Tensor:
    """Indices of the boxes greedy NMS keeps within each (image, group), then the first
    `topk` of each image (all if negative); ordered by image, then descending score. Boxes
    and scores are taken in fp32 whatever the autocast dtype."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    boxes, scores = boxes.float(), scores.float()
    order = _by_image_then_score(scores, images)
    owner = images[order]
    counts = torch.bincount(owner)
    num_images, width = counts.shape[0], int(counts.max())
    rank = torch.arange(len(order), device=order.device) - (torch.cumsum(counts, 0) - counts)[owner]
    slots = torch.full((num_images, width), -1, dtype=torch.int64, device=boxes.device)
    slots[owner, rank] = order
    valid = slots >= 0
    padded = boxes[slots.clamp(min=0)]
    padded_groups = torch.where(valid, groups[slots.clamp(min=0)], -1)
    areas = (padded[..., 2] - padded[..., 0]) * (padded[..., 3] - padded[..., 1])
    cap = width if topk < 0 else min(topk, width)
    t32 = strict_threshold(iou_threshold)
    kept = _Kept(num_images, cap, boxes.device)
    keep = torch.zeros_like(valid)
    for start in range(0, width, block):
        stop = min(start + block, width)
        alive = valid[:, start:stop] & (kept.count < cap)[:, None]
        if not alive.any():
            break
        b, g, a = padded[:, start:stop], padded_groups[:, start:stop], areas[:, start:stop]
        if kept.most > 0:
            kb, kg, ka = kept.filled()
            earlier = _overlaps(kb, ka, b, a, t32) & (kg[:, :, None] == g[:, None, :])
            alive &= ~earlier.any(dim=1)
        later = torch.ones(stop - start, stop - start, dtype=torch.bool, device=boxes.device)
        suppresses = _overlaps(b, a, b, a, t32) & (g[:, :, None] == g[:, None, :])
        suppresses &= later.triu_(diagonal=1)
        chosen = _settle(alive, suppresses)
        chosen &= kept.count[:, None] + torch.cumsum(chosen, dim=1) <= cap
        keep[:, start:stop] = chosen
        kept.add(chosen, b, g, a)
    return slots[keep]


class _Kept:
    """The boxes kept so far, per image, packed to the left of (images, cap) buffers: later
    blocks are compared with these alone, never with every earlier box."""

    def __init__(self, num_images: int, cap: int, device: torch.device) -> None:
        self.boxes = torch.zeros(num_images, cap, 4, device=device)
        self.groups = torch.full((num_images, cap), -2, dtype=torch.int64, device=device)
        self.areas = torch.zeros(num_images, cap, device=device)
        self.count = torch.zeros(num_images, dtype=torch.int64, device=device)
        self.most = 0

    def filled(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The buffers up to the fullest image's count (unfilled slots have group -2, which
        no box has)."""
        return (self.boxes[:, : self.most], self.groups[:, : self.most],
                self.areas[:, : self.most])

    def add(self, chosen: torch.Tensor, boxes: torch.Tensor, groups: torch.Tensor,
            areas: torch.Tensor) -> None:
        image, column = torch.nonzero(chosen, as_tuple=True)
        slot = self.count[image] + torch.cumsum(chosen, dim=1)[image, column] - 1
        self.boxes[image, slot] = boxes[image, column]
        self.groups[image, slot] = groups[image, column]
        self.areas[image, slot] = areas[image, column]
        self.count += chosen.sum(dim=1)
        self.most = int(self.count.max())
