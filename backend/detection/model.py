"""GeneralizedRCNN assembled from a DetectorConfig: backbone -> RPN -> ROI heads.

Images go in as float tensors (C, H, W) in the config's channel order and 0-255 range,
already resized; detections come out in the same pixel frame. Resizing to the test size
and back is the predictor's job.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import DetectorConfig
from .fpn import FPN
from .resnet import ResNet
from .roi_heads import Res5ROIHeads, StandardROIHeads
from .rpn import RPN
from .structures import BatchDetections, Detections, ImageBatch, Targets
from .trident import active_branches, merge_branches


class GeneralizedRCNN(nn.Module):
    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        resnet = ResNet(cfg.resnet, cfg.trident)
        self.backbone: ResNet | FPN = FPN(resnet, cfg.fpn) if cfg.fpn else resnet
        channels = {self.backbone.out_channels[f] for f in cfg.rpn.in_features}
        if len(channels) != 1:
            raise ValueError("MODEL.RPN.IN_FEATURES must have the same number of channels")
        self.proposal_generator = RPN(
            cfg.rpn,
            cfg.anchors,
            channels.pop(),
            [self.backbone.strides[f] for f in cfg.rpn.in_features],
        )
        heads = cfg.roi_heads
        if cfg.fpn:
            self.roi_heads: Res5ROIHeads | StandardROIHeads = StandardROIHeads(
                heads,
                self.backbone.out_channels[heads.in_features[0]],
                [self.backbone.strides[f] for f in heads.in_features],
            )
        else:
            self.roi_heads = Res5ROIHeads(
                heads, cfg.resnet, self.backbone.strides[heads.in_features[0]]
            )
        self.register_buffer(
            "pixel_mean", torch.tensor(cfg.pixel_mean).view(-1, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(cfg.pixel_std).view(-1, 1, 1), persistent=False
        )

    def configure_inference(self, nms_method: str, roi_budget_bytes: int, roi_align: str) -> None:
        """How the heads run (the same detections either way): which NMS, the ROI chunks'
        memory bound (see ROIHeads), which ROIAlign (see roi_align.py; the Triton kernel is
        measured and tested on C4 heads only, so FPN heads pool with torchvision's there)."""
        self.proposal_generator.nms_method = nms_method
        self.roi_heads.box_predictor.nms_method = nms_method
        self.roi_heads.roi_budget_bytes = roi_budget_bytes
        fpn_triton = self.cfg.fpn and roi_align == "triton"
        self.roi_heads.pooler.method = "torchvision" if fpn_triton else roi_align

    def compile_fixed_parts(self, mode: str = "default") -> None:
        """torch.compile the parts whose shapes repeat batch after batch: the backbone (one
        shape per tile size), in `mode` (reduce-overhead: replayed as a CUDA Graph on a GPU,
        one recording per batch shape), and the box head (one per ROI chunk size, which
        varies, so it is compiled for dynamic sizes, never graphed). Their elementwise work
        (norms, ReLU, residual adds) fuses into fewer passes; proposal selection and NMS
        stay eager."""
        self.backbone.compile(dynamic=False, mode=mode)
        self.roi_heads.box_network.compile(dynamic=True, mode="default")

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(
        self,
        images: list[torch.Tensor],
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> ImageBatch:
        """Normalise each (C, H, W) image (any dtype: uint8 crosses to the device at a
        quarter of float's bytes), then pad them into one batch (padding is 0 after
        normalisation, as in detectron2)."""
        normalized = [
            (im.to(self.device).float() - self.pixel_mean) / self.pixel_std for im in images
        ]
        return ImageBatch.from_images(normalized, self.backbone.size_divisibility, memory_format)

    def forward(
        self, images: list[torch.Tensor], targets: list[Targets] | None = None
    ) -> list[Detections] | dict[str, torch.Tensor]:
        """Detections per image in inference; the loss dict when given targets to train on."""
        if targets is not None:
            return self.losses(images, targets)
        return self.inference(images)

    def inference(self, images: list[torch.Tensor]) -> list[Detections]:
        batch = self.preprocess(images)
        return self.detect(batch).split(batch.sizes)

    def embed(self, batch: ImageBatch) -> torch.Tensor:
        """(N, C) unit vectors: each image's deepest feature map the box heads read, averaged
        over its real pixels (not the padding) and over TridentNet's branches. Images the
        model sees alike lie close, whatever they hold: what selection spreads a batch by."""
        level = self.cfg.roi_heads.in_features[-1]
        features = self.backbone(batch.tensor)[level].float()
        stride = self.backbone.strides[level]
        pooled = torch.stack([
            features[i::len(batch.sizes)][:, :, : -(-h // stride), : -(-w // stride)]
            .mean(dim=(0, 2, 3)) for i, (h, w) in enumerate(batch.sizes)])
        return torch.nn.functional.normalize(pooled, dim=1)

    def detect(self, batch: ImageBatch) -> BatchDetections:
        """Detections of a padded batch, in its (resized) pixels, grouped by image."""
        features = self.backbone(batch.tensor)
        branches = active_branches(self.cfg.trident, self.training)
        sizes = batch.sizes * branches
        proposals, _ = self.proposal_generator(features, sizes)
        detections, _ = self.roi_heads(features, proposals, sizes)
        heads = self.cfg.roi_heads
        if branches == 1:
            return detections
        return merge_branches(
            detections,
            len(batch.sizes),
            heads.num_classes,
            heads.nms_thresh_test,
            heads.detections_per_image,
            self.roi_heads.box_predictor.nms_method,
        )

    def losses(self, images: list[torch.Tensor], targets: list[Targets]) -> dict[str, torch.Tensor]:
        """detectron2's training losses; every trident branch trains on every box."""
        batch = self.preprocess(images)
        targets = [t.to(self.device) for t in targets]
        features = self.backbone(batch.tensor)
        branches = active_branches(self.cfg.trident, training=True)
        sizes = batch.sizes * branches
        all_targets = [t.reseeded(branch) for branch in range(branches) for t in targets]
        proposals, rpn_losses = self.proposal_generator(features, sizes, all_targets)
        _, head_losses = self.roi_heads(features, proposals, sizes, all_targets)
        return {**rpn_losses, **head_losses}
