"""Box arithmetic used by the RPN and ROI heads: delta coding, clipping, matching, sampling."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms as _tv_batched_nms

from .nms import batched_greedy_nms

# Limit on exp(dw), dh so that a wild regression cannot make a box overflow.
_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Encodes boxes as (dx, dy, dw, dh) deltas relative to reference boxes, R-CNN style."""

    def __init__(self, weights: Sequence[float]) -> None:
        self.weights = tuple(float(w) for w in weights)

    def encode(self, reference: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        wx, wy, ww, wh = self.weights
        ref_w = reference[:, 2] - reference[:, 0]
        ref_h = reference[:, 3] - reference[:, 1]
        ref_x = reference[:, 0] + 0.5 * ref_w
        ref_y = reference[:, 1] + 0.5 * ref_h
        tgt_w = target[:, 2] - target[:, 0]
        tgt_h = target[:, 3] - target[:, 1]
        tgt_x = target[:, 0] + 0.5 * tgt_w
        tgt_y = target[:, 1] + 0.5 * tgt_h
        return torch.stack(
            (
                wx * (tgt_x - ref_x) / ref_w,
                wy * (tgt_y - ref_y) / ref_h,
                ww * torch.log(tgt_w / ref_w),
                wh * torch.log(tgt_h / ref_h),
            ),
            dim=1,
        )

    def decode(self, deltas: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Apply (N, k*4) deltas to (N, 4) reference boxes; returns (N, k*4) boxes."""
        deltas = deltas.float()
        reference = reference.to(deltas.dtype)
        widths = reference[:, 2] - reference[:, 0]
        heights = reference[:, 3] - reference[:, 1]
        ctr_x = reference[:, 0] + 0.5 * widths
        ctr_y = reference[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=_SCALE_CLAMP)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=_SCALE_CLAMP)
        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        pred_w = torch.exp(dw) * widths[:, None]
        pred_h = torch.exp(dh) * heights[:, None]
        boxes = torch.stack(
            (
                pred_ctr_x - 0.5 * pred_w,
                pred_ctr_y - 0.5 * pred_h,
                pred_ctr_x + 0.5 * pred_w,
                pred_ctr_y + 0.5 * pred_h,
            ),
            dim=-1,
        )
        return boxes.reshape(deltas.shape)


def clip_boxes(
    boxes: torch.Tensor, height: int | torch.Tensor, width: int | torch.Tensor
) -> torch.Tensor:
    """Clamp (N, 4) boxes into an image of the given size, or each row into its own image
    when `height` and `width` are (N,) tensors (a whole batch at once)."""
    lower = boxes.clamp(min=0)
    return torch.stack(
        (
            torch.minimum(lower[:, 0], torch.as_tensor(width, dtype=boxes.dtype)),
            torch.minimum(lower[:, 1], torch.as_tensor(height, dtype=boxes.dtype)),
            torch.minimum(lower[:, 2], torch.as_tensor(width, dtype=boxes.dtype)),
            torch.minimum(lower[:, 3], torch.as_tensor(height, dtype=boxes.dtype)),
        ),
        dim=-1,
    )


def nonempty(boxes: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    return ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box in `a` (M, 4) with every box in `b` (N, 4); 0 where the union is 0."""
    area_a, area_b = box_area(a), box_area(b)
    wh = (torch.min(a[:, None, 2:], b[:, 2:]) - torch.max(a[:, None, :2], b[:, :2])).clamp(min=0)
    inter = wh.prod(dim=2)
    return torch.where(
        inter > 0,
        inter / (area_a[:, None] + area_b - inter),
        torch.zeros(1, dtype=inter.dtype, device=inter.device),
    )


NMS_METHODS = ("exact", "torchvision")


def nms_per_image(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    images: torch.Tensor,
    num_groups: int,
    iou_threshold: float,
    topk: int,
    method: str = "exact",
) -> torch.Tensor:
    """Indices kept by NMS within each (image, class) group and then the first `topk` of
    each image (all if negative), ordered by image, then by descending score; boxes and
    scores in fp32 whatever the autocast. `exact` is one greedy NMS for the whole batch in
    tensor ops (`nms.batched_greedy_nms`); `torchvision` is torchvision's `batched_nms`,
    kept to compare against. `classes` must be < `num_groups`."""
    if method == "exact":
        return batched_greedy_nms(boxes, scores, classes, images, iou_threshold, topk)
    if method != "torchvision":
        raise ValueError(f"NMS method {method!r} is not one of {NMS_METHODS}")
    keep = _tv_batched_nms(
        boxes.float(), scores.float(), images * num_groups + classes, iou_threshold
    )
    keep = keep[torch.sort(images[keep], stable=True).indices]
    if topk < 0 or len(keep) == 0:
        return keep
    owner = images[keep]
    counts = torch.bincount(owner)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(keep), device=keep.device) - first[owner]
    return keep[rank < topk]


class Matcher:
    """Assigns each prediction (column) to its best ground truth (row) and labels it by IoU.

    `thresholds` split IoU into intervals labelled by `labels` (1 foreground, 0 background,
    -1 ignored). With `allow_low_quality_matches`, every ground truth keeps the predictions
    that overlap it best even below the foreground threshold.
    """

    def __init__(
        self,
        thresholds: Sequence[float],
        labels: Sequence[int],
        allow_low_quality_matches: bool = False,
    ) -> None:
        self.thresholds = [-float("inf"), *thresholds, float("inf")]
        self.labels = list(labels)
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if quality.numel() == 0:
            count = quality.size(1)
            matches = quality.new_zeros(count, dtype=torch.int64)
            return matches, quality.new_full((count,), self.labels[0], dtype=torch.int8)
        matched_vals, matches = quality.max(dim=0)
        match_labels = matches.new_full(matches.size(), 1, dtype=torch.int8)
        for label, low, high in zip(
            self.labels, self.thresholds[:-1], self.thresholds[1:], strict=True
        ):
            match_labels[(matched_vals >= low) & (matched_vals < high)] = label
        if self.allow_low_quality_matches:
            best_per_gt, _ = quality.max(dim=1)
            _, best_preds = torch.nonzero(quality == best_per_gt[:, None], as_tuple=True)
            match_labels[best_preds] = 1
        return matches, match_labels


def subsample_labels(
    labels: torch.Tensor,
    num_samples: int,
    positive_fraction: float,
    bg_label: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly pick at most `num_samples` indices, at most `positive_fraction` foreground;
    labels of -1 are never picked. A (CPU) `generator` makes the draw the image's own."""
    positive = torch.nonzero((labels != -1) & (labels != bg_label), as_tuple=True)[0]
    negative = torch.nonzero(labels == bg_label, as_tuple=True)[0]
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    pos_idx = positive[_permutation(positive, generator)[:num_pos]]
    neg_idx = negative[_permutation(negative, generator)[:num_neg]]
    return pos_idx, neg_idx


def _permutation(index: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randperm(index.numel(), device=index.device)
    return torch.randperm(index.numel(), generator=generator).to(index.device)


def smooth_l1_sum(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Summed smooth-L1 box regression loss; beta 0 (detectron2's default) is plain L1."""
    if beta < 1e-5:
        return torch.abs(pred - target).sum()
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")
