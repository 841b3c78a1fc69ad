"""TridentNet: one res4 stage run as parallel branches that share every weight and differ
only in the dilation of their 3x3 convs, so each branch sees objects of another scale.

Training runs all branches; at test time `TEST_BRANCH_IDX` >= 0 runs just that branch
("TridentNet-Fast"), -1 runs all of them and merges their detections.
"""

from __future__ import annotations

import torch
from torch import nn

from .boxes import nms_per_image
from .config import TridentConfig
from .structures import BatchDetections


def active_branches(trident: TridentConfig | None, training: bool) -> int:
    """How many copies of each image flow through the network after the trident stage."""
    if trident is None:
        return 1
    return trident.num_branch if training or trident.test_branch_idx == -1 else 1


class TridentStage(nn.Sequential):
    """A stage of bottleneck blocks run once per branch. Its children keep the plain
    stage's key names (`res4.0.conv2.weight`), which is why a TridentNet checkpoint equals
    a C4 one."""

    def __init__(self, blocks: nn.Sequential, cfg: TridentConfig) -> None:
        super().__init__(*blocks)
        if len(cfg.branch_dilations) != cfg.num_branch:
            raise ValueError(
                f"TRIDENT.BRANCH_DILATIONS {cfg.branch_dilations} must have NUM_BRANCH="
                f"{cfg.num_branch} entries"
            )
        self.cfg = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.cfg.test_branch_idx == -1:
            dilations = self.cfg.branch_dilations
        else:
            dilations = (self.cfg.branch_dilations[self.cfg.test_branch_idx],)
        branches = [x] * len(dilations)
        for block in self:
            branches = [
                block(b, dilation=d) for b, d in zip(branches, dilations, strict=True)
            ]
        # Branch-major: [branch0 img0..imgN-1, branch1 img0.., ...].
        return torch.cat(branches) if len(branches) > 1 else branches[0]


def merge_branches(
    det: BatchDetections,
    num_images: int,
    num_classes: int,
    nms_thresh: float,
    topk: int,
    nms_method: str = "exact",
) -> BatchDetections:
    """Join each image's detections from all branches (rows of "image" i + N*j belong to
    image i, branch j), then class-aware NMS and top-k per image."""
    images = det.images % num_images
    keep = nms_per_image(
        det.boxes, det.scores, det.classes, images, num_classes, nms_thresh, topk, nms_method
    )
    return BatchDetections(det.boxes[keep], det.scores[keep], det.classes[keep], images[keep])
