"""Region proposal network: anchors, the shared conv head, proposal selection and losses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .boxes import (
    BoxCoder,
    Matcher,
    clip_boxes,
    nms_per_image,
    nonempty,
    pairwise_iou,
    smooth_l1_sum,
    subsample_labels,
)
from .config import AnchorConfig, RPNConfig
from .structures import Proposals, Targets


def _per_level(params: tuple[tuple[float, ...], ...], levels: int) -> tuple[tuple[float, ...], ...]:
    if len(params) == 1:
        return params * levels
    if len(params) != levels:
        raise ValueError(f"anchor settings give {len(params)} levels, the RPN has {levels}")
    return params


def cell_anchors(sizes: tuple[float, ...], aspect_ratios: tuple[float, ...]) -> torch.Tensor:
    """Anchors centred on (0, 0), size-major then ratio, as (len(sizes)*len(ratios), 4)."""
    anchors = []
    for size in sizes:
        area = size**2.0
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors)


class AnchorGenerator(nn.Module):
    """Tiles each level's cell anchors over its feature grid, row-major, anchors innermost."""

    def __init__(self, cfg: AnchorConfig, strides: list[int]) -> None:
        super().__init__()
        sizes = _per_level(cfg.sizes, len(strides))
        ratios = _per_level(cfg.aspect_ratios, len(strides))
        self.strides = strides
        self.offset = cfg.offset
        for i, (s, r) in enumerate(zip(sizes, ratios, strict=True)):
            self.register_buffer(f"cell{i}", cell_anchors(s, r), persistent=False)
        counts = {len(s) * len(r) for s, r in zip(sizes, ratios, strict=True)}
        if len(counts) != 1:
            raise ValueError("every RPN level needs the same number of anchors per position")
        self.num_anchors = counts.pop()

    def _centres(self, cells: int, stride: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.offset * stride, cells * stride, step=stride,
                            dtype=torch.float32, device=device)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        anchors = []
        for i, (feature, stride) in enumerate(zip(features, self.strides, strict=True)):
            base: torch.Tensor = getattr(self, f"cell{i}")
            height, width = feature.shape[-2:]
            xs = self._centres(width, stride, base.device)
            ys = self._centres(height, stride, base.device)
            shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            anchors.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        return anchors


class RPNHead(nn.Module):
    """3x3 conv + ReLU shared by all levels, then 1x1 objectness and box-delta predictors."""

    def __init__(self, in_channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0)

    def forward(
        self, features: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = [], []
        for x in features:
            t = F.relu(self.conv(x))
            logits.append(self.objectness_logits(t))
            deltas.append(self.anchor_deltas(t))
        return logits, deltas


class RPN(nn.Module):
    def __init__(
        self, cfg: RPNConfig, anchors: AnchorConfig, in_channels: int, strides: list[int]
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.anchor_generator = AnchorGenerator(anchors, strides)
        self.rpn_head = RPNHead(in_channels, self.anchor_generator.num_anchors)
        self.box_coder = BoxCoder(cfg.bbox_reg_weights)
        self.matcher = Matcher(cfg.iou_thresholds, cfg.iou_labels, allow_low_quality_matches=True)
        self.nms_method = "exact"

    def forward(
        self,
        features: dict[str, torch.Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[Targets] | None = None,
    ) -> tuple[Proposals, dict[str, torch.Tensor]]:
        """Proposal boxes of the batch (by image, then objectness) and, given targets, the
        losses."""
        feats = [features[f] for f in self.cfg.in_features]
        anchors = self.anchor_generator(feats)
        raw_logits, raw_deltas = self.rpn_head(feats)
        # (N, A, H, W) -> (N, H*W*A) and (N, A*4, H, W) -> (N, H*W*A, 4): anchor order.
        logits = [x.permute(0, 2, 3, 1).flatten(1) for x in raw_logits]
        deltas = [
            x.view(x.shape[0], -1, 4, x.shape[-2], x.shape[-1])
            .permute(0, 3, 4, 1, 2)
            .flatten(1, -2)
            for x in raw_deltas
        ]
        losses: dict[str, torch.Tensor] = {}
        if targets is not None:
            losses = self.losses(anchors, logits, deltas, image_sizes, targets)
        with torch.no_grad():
            proposals = self.select_proposals(anchors, logits, deltas, image_sizes)
        return proposals, losses

    def select_proposals(
        self,
        anchors: list[torch.Tensor],
        logits: list[torch.Tensor],
        deltas: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> Proposals:
        """Top-k anchors per image and level by objectness, decoded, clipped, NMS'd within
        each level, then the best `post_nms_topk` per image: detectron2's selection, done
        for the whole batch at once (fp32 coordinates and scores whatever the autocast)."""
        phase = 0 if self.training else 1
        pre_nms, post_nms = self.cfg.pre_nms_topk[phase], self.cfg.post_nms_topk[phase]
        num_images = len(image_sizes)
        device = logits[0].device
        rows = torch.arange(num_images, device=device)[:, None]
        boxes, scores, levels = [], [], []
        for level, (anchors_i, logits_i, deltas_i) in enumerate(
            zip(anchors, logits, deltas, strict=True)
        ):
            k = min(pre_nms, logits_i.shape[1])
            top_scores, idx = logits_i.float().topk(k, dim=1)
            decoded = self.box_coder.decode(
                deltas_i[rows, idx].reshape(-1, 4), anchors_i[idx].reshape(-1, 4)
            )
            boxes.append(decoded.view(num_images, k, 4))
            scores.append(top_scores)
            levels.append(torch.full((num_images, k), level, dtype=torch.int64, device=device))
        flat_boxes = torch.cat(boxes, dim=1).flatten(0, 1)
        flat_scores = torch.cat(scores, dim=1).flatten()
        flat_levels = torch.cat(levels, dim=1).flatten()
        images = rows.expand(-1, flat_levels.numel() // num_images).flatten()
        finite = torch.isfinite(flat_boxes).all(dim=1) & torch.isfinite(flat_scores)
        if self.training and not finite.all():
            raise FloatingPointError(
                "RPN predicted non-finite boxes or scores: the training has diverged"
            )
        sizes = torch.tensor(image_sizes, dtype=torch.float32, device=device)[images]
        flat_boxes = clip_boxes(flat_boxes, sizes[:, 0], sizes[:, 1])
        valid = torch.nonzero(finite & nonempty(flat_boxes, self.cfg.min_box_size))[:, 0]
        keep = valid[
            nms_per_image(
                flat_boxes[valid],
                flat_scores[valid],
                flat_levels[valid],
                images[valid],
                len(anchors),
                self.cfg.nms_thresh,
                post_nms,
                self.nms_method,
            )
        ]
        return Proposals(flat_boxes[keep], images[keep])

    def losses(
        self,
        anchors: list[torch.Tensor],
        logits: list[torch.Tensor],
        deltas: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[Targets],
    ) -> dict[str, torch.Tensor]:
        all_anchors = torch.cat(anchors)
        labels, matched = zip(
            *(
                self._label_anchors(all_anchors, t, size)
                for t, size in zip(targets, image_sizes, strict=True)
            ),
            strict=True,
        )
        gt_labels = torch.stack(labels)
        positive = gt_labels == 1
        gt_deltas = torch.stack([self.box_coder.encode(all_anchors, m) for m in matched])
        pred_deltas = torch.cat(deltas, dim=1)
        loc = smooth_l1_sum(pred_deltas[positive], gt_deltas[positive], self.cfg.smooth_l1_beta)
        valid = gt_labels >= 0
        objectness = F.binary_cross_entropy_with_logits(
            torch.cat(logits, dim=1)[valid], gt_labels[valid].to(torch.float32), reduction="sum"
        )
        normalizer = self.cfg.batch_size_per_image * len(targets)
        return {
            "loss_rpn_cls": objectness / normalizer * self.cfg.loss_weight,
            "loss_rpn_loc": loc / normalizer * self.cfg.loss_weight * self.cfg.bbox_reg_loss_weight,
        }

    @torch.no_grad()
    def _label_anchors(
        self, anchors: torch.Tensor, target: Targets, image_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """1/0/-1 label per anchor (sampled) and the ground-truth box each is matched to."""
        matched_idx, labels = self.matcher(pairwise_iou(target.boxes, anchors))
        labels = labels.to(torch.int64)
        if self.cfg.boundary_thresh >= 0:
            t = self.cfg.boundary_thresh
            height, width = image_size
            inside = (
                (anchors[:, 0] >= -t)
                & (anchors[:, 1] >= -t)
                & (anchors[:, 2] < width + t)
                & (anchors[:, 3] < height + t)
            )
            labels[~inside] = -1
        pos, neg = subsample_labels(
            labels, self.cfg.batch_size_per_image, self.cfg.positive_fraction, 0,
            target.generator(0),
        )
        labels.fill_(-1)
        labels.scatter_(0, pos, 1)
        labels.scatter_(0, neg, 0)
        if len(target.boxes) == 0:
            return labels, torch.zeros_like(anchors)
        return labels, target.boxes[matched_idx]
