"""Test-time views: an image run as it is and mirrored, its boxes fused.

A box regressor's error is partly particular to the view it sees; averaging the boxes that
several mirrored views give one object cancels part of it, and a score averaged over the
views drops what only one view believes. Aerial tiles have no up or down, so all four
mirrorings are fair views of them. What it gives annotators, as measured so far:
docs/surveys.md ("Mirrored views").

Boxes of one class whose IoU with a group's fused box reaches FUSE_IOU join it: the fused
box is their score-weighted mean and its score their summed scores over the number of views
(a box seen in one view of two keeps half its score), as Weighted Boxes Fusion does
(Solovyev et al., 2019). Written here rather than taken from the `ensemble-boxes` package,
which brings numba and pandas for these thirty lines.
"""

from __future__ import annotations

import torch

from .boxes import pairwise_iou
from .structures import Detections

VIEWS = (1, 2, 4)
FLIPS = ((False, False), (True, False), (False, True), (True, True))  # (left-right, up-down)
FUSE_IOU = 0.55


def checked_views(views: int) -> int:
    """`views` if it is one the engine runs, else a ValueError naming the choices."""
    if views not in VIEWS:
        raise ValueError(f"views {views!r} must be one of {VIEWS}: the image as it is, also "
                         "mirrored left-right, and up-down too")
    return views


def mirrored(image: torch.Tensor, left_right: bool, up_down: bool) -> torch.Tensor:
    """An (H, W, C) image mirrored."""
    dims = [d for d, flip in ((1, left_right), (0, up_down)) if flip]
    return image.flip(dims) if dims else image


def unmirrored(found: Detections, size: tuple[int, int], left_right: bool, up_down: bool
               ) -> Detections:
    """Detections made on a mirrored (height, width) image, in the image's own pixels."""
    boxes = found.boxes.clone()
    height, width = size
    if left_right:
        boxes[:, [0, 2]] = width - found.boxes[:, [2, 0]]
    if up_down:
        boxes[:, [1, 3]] = height - found.boxes[:, [3, 1]]
    return Detections(boxes, found.scores, found.classes, found.image_size)


def fuse(views: list[Detections], limit: int) -> Detections:
    """One image's detections from each view, fused (see the module's docstring): the
    `limit` best (TEST.DETECTIONS_PER_IMAGE, which the views' union could exceed)."""
    merged = Detections.cat(views)
    if len(merged) == 0:
        return merged
    boxes, scores, classes = [], [], []
    for cls in merged.classes.unique().tolist():
        one = merged.select(torch.nonzero(merged.classes == cls).flatten())
        for members, box in _groups(one):
            boxes.append(box)
            scores.append(one.scores[members].sum() / max(len(views), len(members)))
            classes.append(cls)
    order = torch.argsort(torch.stack(scores), descending=True, stable=True)[:limit]
    return Detections(torch.stack(boxes)[order], torch.stack(scores)[order],
                      torch.tensor(classes, dtype=merged.classes.dtype)[order],
                      views[0].image_size)


def _groups(found: Detections) -> list[tuple[list[int], torch.Tensor]]:
    """The boxes of each object (indices, best first) and their fused box: each box joins
    the group whose fused box it overlaps most, from FUSE_IOU on, else starts its own."""
    groups: list[list[int]] = []
    fused: list[torch.Tensor] = []
    for i in torch.argsort(found.scores, descending=True, stable=True).tolist():
        box = found.boxes[i : i + 1]
        overlap = pairwise_iou(box, torch.stack(fused))[0] if fused else torch.zeros(0)
        if len(overlap) and float(overlap.max()) >= FUSE_IOU:
            g = int(overlap.argmax())
            groups[g].append(i)
            weights = found.scores[groups[g]]
            fused[g] = (found.boxes[groups[g]] * weights[:, None]).sum(0) / weights.sum()
        else:
            groups.append([i])
            fused.append(found.boxes[i])
    return list(zip(groups, fused, strict=True))
