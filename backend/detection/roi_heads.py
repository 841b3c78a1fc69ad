"""Second stage: pool features for each proposal, classify it and refine its box.

Res5ROIHeads (C4 and TridentNet models) run ResNet's res5 stage on 14x14 pooled features;
StandardROIHeads (FPN models) pool 7x7 from the pyramid level that fits each box and apply
two fully connected layers. Both end in the same FastRCNN box predictor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from .boxes import (
    BoxCoder,
    Matcher,
    box_area,
    clip_boxes,
    nms_per_image,
    pairwise_iou,
    smooth_l1_sum,
    subsample_labels,
)
from .config import ResNetConfig, ROIHeadsConfig
from .layers import c2_xavier_init
from .resnet import make_stage, stage_widths
from .roi_align import roi_align_channels_last, roi_align_threads
from .structures import BatchDetections, Proposals, Targets


def _memory_format(feature: torch.Tensor) -> torch.memory_format:
    if not feature.is_contiguous() and feature.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class ROIPooler(nn.Module):
    """ROIAlign over one feature map, or over a pyramid with each box sent to the level
    floor(4 + log2(sqrt(area) / 224)), clamped to the levels present."""

    def __init__(
        self, output_size: int, scales: list[float], sampling_ratio: int, aligned: bool
    ) -> None:
        super().__init__()
        self.output_size = (output_size, output_size)
        self.scales = scales
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.min_level = int(-math.log2(scales[0]))
        self.max_level = int(-math.log2(scales[-1]))
        self.method = "torchvision"  # or "threads", "triton": see roi_align.py

    def forward(
        self,
        features: list[torch.Tensor],
        boxes: torch.Tensor,
        images: torch.Tensor,
        step: int = 1,
    ) -> torch.Tensor:
        """Pooled features of each box (P, 4) of image `images[i]`, in the features' dtype;
        with `step` > 1, only every step-th bin in each direction (what a strided 1x1 conv
        reads next)."""
        rois = torch.cat([images[:, None].to(torch.float32), boxes.float()], dim=1)
        if len(features) == 1:  # C4: convolutions follow, in the features' memory format
            return self._align(
                features[0], rois, self.scales[0], _memory_format(features[0]), step
            )
        levels = self._assign_levels(boxes)
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales, strict=True)):
            index = torch.nonzero(levels == level, as_tuple=True)[0]
            out.index_put_((index,), self._align(feature, rois[index], scale))
        return out

    def _align(
        self,
        feature: torch.Tensor,
        rois: torch.Tensor,
        scale: float,
        memory_format: torch.memory_format = torch.contiguous_format,
        step: int = 1,
    ) -> torch.Tensor:
        """ROIAlign with fp32 coordinates: in bf16, box coordinates of 512-1023 px fall on
        4 px steps. torchvision's kernel also takes fp32 features; the bins kept, the cast
        back and the layout change are then one pass. The Triton kernel reads the features
        in their dtype and writes the kept bins channels-last directly."""
        if self.method == "triton":
            return roi_align_channels_last(
                feature, rois, self.output_size, scale, self.sampling_ratio, self.aligned, step
            ).contiguous(memory_format=memory_format)
        align = roi_align_threads if self.method == "threads" else roi_align
        pooled = align(
            feature.float(), rois, self.output_size, scale, self.sampling_ratio, self.aligned
        )
        if step > 1:
            pooled = pooled[:, :, ::step, ::step]
        return pooled.to(dtype=feature.dtype, memory_format=memory_format)

    def _assign_levels(self, boxes: torch.Tensor) -> torch.Tensor:
        sizes = torch.sqrt(box_area(boxes))
        levels = torch.floor(4 + torch.log2(sizes / 224 + 1e-8))
        levels = torch.clamp(levels, min=self.min_level, max=self.max_level)
        return levels.to(torch.int64) - self.min_level


class BoxPredictor(nn.Module):
    """Class scores (K + 1, background last) and per-class box deltas for each ROI."""

    def __init__(self, in_features: int, cfg: ROIHeadsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        reg_classes = 1 if cfg.cls_agnostic_bbox_reg else cfg.num_classes
        self.cls_score = nn.Linear(in_features, cfg.num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, reg_classes * 4)
        self.box_coder = BoxCoder(cfg.bbox_reg_weights)
        self.nms_method = "exact"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.constant_(self.cls_score.bias, 0)
        nn.init.constant_(self.bbox_pred.bias, 0)

    def start_from_other_classes(self, source: dict[str, torch.Tensor]) -> bool:
        """Start this head for new classes from `source`, a head trained on others
        (`cls_score.weight` ... `bbox_pred.bias`): every new class begins as the mean of the
        source's classes, in its score and its box deltas, and background as the source's.
        The first detections are then the source's animals, boxed as it boxes them, and
        training only has to tell the new classes apart; a reset head forgets how to box,
        and a few hundred steps on a new survey's few labels then give fragments of
        animals. False (head reset) when the source's features differ in width."""
        weight, deltas = source.get("cls_score.weight"), source.get("bbox_pred.weight")
        if (weight is None or deltas is None
                or weight.shape[1] != self.cls_score.in_features
                or deltas.shape[1] != self.bbox_pred.in_features):
            self.reset_parameters()
            return False
        width = self.bbox_pred.out_features // 4
        with torch.no_grad():
            for part, layer in (("weight", self.cls_score), ("bias", self.cls_score)):
                value = source[f"cls_score.{part}"]
                getattr(layer, part)[:-1] = value[:-1].mean(0)
                getattr(layer, part)[-1] = value[-1]
            for part in ("weight", "bias"):
                value = source[f"bbox_pred.{part}"]
                per_class = value.reshape(-1, 4, *value.shape[1:]).mean(0)
                getattr(self.bbox_pred, part).copy_(
                    per_class.repeat(width, *([1] * (value.dim() - 1))))
        return True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.flatten(x, start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)

    def inference(
        self,
        scores: torch.Tensor,
        deltas: torch.Tensor,
        proposals: Proposals,
        image_sizes: list[tuple[int, int]],
    ) -> BatchDetections:
        """Score threshold per (box, class), class-aware NMS, top-k per image: detectron2's
        order, for the whole batch at once. Deltas and scores are decoded in fp32."""
        boxes = self.box_coder.decode(deltas, proposals.boxes)
        probs = F.softmax(scores.float(), dim=-1)
        finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1)
        probs = probs[:, :-1]
        reg_classes = boxes.shape[1] // 4
        sizes = torch.tensor(image_sizes, dtype=torch.float32, device=boxes.device)
        bounds = sizes[proposals.images].repeat_interleave(reg_classes, dim=0)
        boxes = clip_boxes(boxes.reshape(-1, 4), bounds[:, 0], bounds[:, 1])
        boxes = boxes.view(-1, reg_classes, 4)
        rows, classes = torch.nonzero((probs > self.cfg.score_thresh_test) & finite[:, None]).T
        candidates = BatchDetections(
            boxes[rows, 0] if reg_classes == 1 else boxes[rows, classes],
            probs[rows, classes],
            classes,
            proposals.images[rows],
        )
        keep = nms_per_image(
            candidates.boxes,
            candidates.scores,
            candidates.classes,
            candidates.images,
            self.num_classes,
            self.cfg.nms_thresh_test,
            self.cfg.detections_per_image,
            self.nms_method,
        )
        return candidates.select(keep)

    def losses(
        self,
        scores: torch.Tensor,
        deltas: torch.Tensor,
        proposal_boxes: torch.Tensor,
        gt_classes: torch.Tensor,
        gt_boxes: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        if gt_classes.numel() == 0:
            zero = scores.sum() * 0.0 + deltas.sum() * 0.0
            return {"loss_cls": zero, "loss_box_reg": zero}
        loss_cls = F.cross_entropy(scores, gt_classes, reduction="mean")
        fg = torch.nonzero((gt_classes >= 0) & (gt_classes < self.num_classes), as_tuple=True)[0]
        if deltas.shape[1] == 4:
            fg_deltas = deltas[fg]
        else:
            fg_deltas = deltas.view(-1, self.num_classes, 4)[fg, gt_classes[fg]]
        gt_deltas = self.box_coder.encode(proposal_boxes[fg], gt_boxes[fg])
        loss_box = smooth_l1_sum(fg_deltas, gt_deltas, self.cfg.smooth_l1_beta)
        loss_box = loss_box / max(gt_classes.numel(), 1.0) * self.cfg.bbox_reg_loss_weight
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box}


ROI_BUDGET_BYTES = 512 * 2**20  # the CPU's default; DeviceOptions sets the device's
_INDEX_LIMIT = 2**31 - 1  # ROIAlign's kernels index their output with 32-bit integers


class ROIHeads(nn.Module):
    """Shared flow: (training) sample proposals against ground truth; pool; predict.

    Proposals go through pooling, the box head and the predictor in chunks, so that no
    chunk's pooled features (fp32, the largest tensor of the head) exceed `roi_budget_bytes`
    or 2**31 elements: a batch of 4 tiles of a 3-branch TridentNet pools 12,000 ROIs x 1024
    x 14 x 14 = 2.46e9 elements in one pass, which overflowed ROIAlign's indexing (a
    segmentation fault) and held 10 GB. Each ROI is computed alone, so chunks change nothing
    in the outputs."""

    box_predictor: BoxPredictor

    def __init__(self, cfg: ROIHeadsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.matcher = Matcher(cfg.iou_thresholds, cfg.iou_labels, allow_low_quality_matches=False)
        self.roi_budget_bytes = ROI_BUDGET_BYTES

    @property
    def box_network(self) -> nn.Module:
        """The network run on each pooled ROI (res5, or the FC box head)."""
        raise NotImplementedError

    def box_features(
        self, features: dict[str, torch.Tensor], boxes: torch.Tensor, images: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def chunk_size(self, features: dict[str, torch.Tensor]) -> int:
        """ROIs per chunk: their fp32 pooled features fit the budget and 32-bit indexing."""
        channels = features[self.cfg.in_features[0]].shape[1]
        per_roi = channels * self.cfg.pooler_resolution**2
        return max(1, min(self.roi_budget_bytes // (4 * per_roi), _INDEX_LIMIT // per_roi))

    def predict_rois(
        self, features: dict[str, torch.Tensor], boxes: torch.Tensor, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class scores and box deltas of each ROI, chunk by chunk."""
        size = self.chunk_size(features)
        parts = [
            self.box_predictor(self.box_features(features, boxes[s : s + size],
                                                 images[s : s + size]))
            for s in range(0, max(len(boxes), 1), size)
        ]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: Proposals,
        image_sizes: list[tuple[int, int]],
        targets: list[Targets] | None = None,
    ) -> tuple[BatchDetections | None, dict[str, torch.Tensor]]:
        if targets is None:
            scores, deltas = self.predict_rois(features, proposals.boxes, proposals.images)
            return self.box_predictor.inference(scores, deltas, proposals, image_sizes), {}
        samples = [self._sample(proposals.of_image(n), t) for n, t in enumerate(targets)]
        boxes = torch.cat([s[0] for s in samples])
        images = torch.cat(
            [torch.full((len(s[0]),), n, device=boxes.device) for n, s in enumerate(samples)]
        )
        scores, deltas = self.predict_rois(features, boxes, images)
        return None, self.box_predictor.losses(
            scores,
            deltas,
            boxes,
            torch.cat([s[1] for s in samples]),
            torch.cat([s[2] for s in samples]),
        )

    @torch.no_grad()
    def _sample(
        self, proposals: torch.Tensor, target: Targets
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sampled proposal boxes with their class (num_classes = background) and matched
        ground-truth box."""
        if self.cfg.proposal_append_gt:
            proposals = torch.cat([proposals, target.boxes.to(proposals.dtype)])
        matched_idx, matched_labels = self.matcher(pairwise_iou(target.boxes, proposals))
        num_classes = self.cfg.num_classes
        if len(target.classes) > 0:
            classes = target.classes[matched_idx]
            classes[matched_labels == 0] = num_classes
            classes[matched_labels == -1] = -1
        else:
            classes = torch.full_like(matched_idx, num_classes)
        fg, bg = subsample_labels(
            classes, self.cfg.batch_size_per_image, self.cfg.positive_fraction, num_classes,
            target.generator(1),
        )
        index = torch.cat([fg, bg])
        if len(target.boxes) > 0:
            gt_boxes = target.boxes[matched_idx[index]]
        else:
            gt_boxes = proposals.new_zeros((len(index), 4))
        return proposals[index], classes[index], gt_boxes


class Res5ROIHeads(ROIHeads):
    """C4 head: 14x14 ROIAlign on res4, res5 stage, global average pool."""

    def __init__(self, cfg: ROIHeadsConfig, resnet: ResNetConfig, stride: int) -> None:
        super().__init__(cfg)
        self.in_feature = cfg.in_features[0]
        self.pooler = ROIPooler(
            cfg.pooler_resolution, [1.0 / stride], cfg.pooler_sampling_ratio, cfg.pooler_aligned
        )
        in_ch, bottleneck_ch, out_ch = stage_widths(resnet, 5)
        self.res5 = make_stage(
            3, 2, in_ch, bottleneck_ch, out_ch, resnet.num_groups, resnet.stride_in_1x1, dilation=1
        )
        self.box_predictor = BoxPredictor(out_ch, cfg)

    @property
    def box_network(self) -> nn.Module:
        return self.res5

    def box_features(
        self, features: dict[str, torch.Tensor], boxes: torch.Tensor, images: torch.Tensor
    ) -> torch.Tensor:
        """With MSRA weights res5's first block reads its 14x14 input at stride 2 (its two
        strided convs are 1x1), so only those 7x7 bins leave the pooler: a quarter of the
        pooled bytes to cast, lay out and read again, and the same result."""
        first = self.res5[0]
        step = first.conv1.stride[0] if first.strides_1x1_only else 1
        pooled = self.pooler([features[self.in_feature]], boxes, images, step)
        return self.res5(pooled, presampled=step > 1).mean(dim=[2, 3])


class FCBoxHead(nn.Module):
    """Flatten, then NUM_FC fully connected layers with ReLU (`fc1`, `fc2`, ...)."""

    def __init__(self, in_features: int, num_fc: int, fc_dim: int) -> None:
        super().__init__()
        self.num_fc = num_fc
        for i in range(num_fc):
            fc = nn.Linear(in_features if i == 0 else fc_dim, fc_dim)
            c2_xavier_init(fc)
            self.add_module(f"fc{i + 1}", fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, start_dim=1)
        for i in range(self.num_fc):
            x = F.relu(getattr(self, f"fc{i + 1}")(x))
        return x


class StandardROIHeads(ROIHeads):
    """FPN head: multi-level 7x7 ROIAlign, FC box head."""

    def __init__(self, cfg: ROIHeadsConfig, channels: int, strides: list[int]) -> None:
        super().__init__(cfg)
        if cfg.num_fc < 1:
            raise ValueError("StandardROIHeads needs MODEL.ROI_BOX_HEAD.NUM_FC >= 1")
        self.pooler = ROIPooler(
            cfg.pooler_resolution,
            [1.0 / s for s in strides],
            cfg.pooler_sampling_ratio,
            cfg.pooler_aligned,
        )
        self.box_head = FCBoxHead(channels * cfg.pooler_resolution**2, cfg.num_fc, cfg.fc_dim)
        self.box_predictor = BoxPredictor(cfg.fc_dim, cfg)

    @property
    def box_network(self) -> nn.Module:
        return self.box_head

    def box_features(
        self, features: dict[str, torch.Tensor], boxes: torch.Tensor, images: torch.Tensor
    ) -> torch.Tensor:
        pooled = self.pooler([features[f] for f in self.cfg.in_features], boxes, images)
        return self.box_head(pooled)
