"""Feature Pyramid Network on a ResNet: p2..p5 from lateral 1x1 + top-down sums, p6 by
subsampling p5 (LastLevelMaxPool), as detectron2's build_resnet_fpn_backbone."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import FPNConfig
from .layers import c2_xavier_init
from .resnet import ResNet


class FPN(nn.Module):
    def __init__(self, bottom_up: ResNet, cfg: FPNConfig) -> None:
        super().__init__()
        if cfg.fuse_type not in ("sum", "avg"):
            raise ValueError(f"FPN.FUSE_TYPE {cfg.fuse_type!r} is not 'sum' or 'avg'")
        self.bottom_up = bottom_up
        self.in_features = cfg.in_features
        self.fuse_type = cfg.fuse_type
        strides = [bottom_up.strides[f] for f in cfg.in_features]
        self.levels = [int(math.log2(s)) for s in strides]
        for level, feature in zip(self.levels, cfg.in_features, strict=True):
            lateral = nn.Conv2d(bottom_up.out_channels[feature], cfg.out_channels, 1)
            output = nn.Conv2d(cfg.out_channels, cfg.out_channels, 3, padding=1)
            c2_xavier_init(lateral)
            c2_xavier_init(output)
            self.add_module(f"fpn_lateral{level}", lateral)
            self.add_module(f"fpn_output{level}", output)
        top = self.levels[-1] + 1
        self.out_features = [f"p{lv}" for lv in self.levels] + [f"p{top}"]
        self.strides = {f"p{lv}": 2**lv for lv in [*self.levels, top]}
        self.out_channels = dict.fromkeys(self.out_features, cfg.out_channels)
        self._size_divisibility = strides[-1]

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        bottom_up = self.bottom_up(x)
        top_level = self.levels[-1]
        prev = getattr(self, f"fpn_lateral{top_level}")(bottom_up[self.in_features[-1]])
        results = [getattr(self, f"fpn_output{top_level}")(prev)]
        for level, feature in zip(self.levels[-2::-1], self.in_features[-2::-1], strict=True):
            top_down = F.interpolate(prev, scale_factor=2.0, mode="nearest")
            prev = getattr(self, f"fpn_lateral{level}")(bottom_up[feature]) + top_down
            if self.fuse_type == "avg":
                prev = prev / 2
            results.insert(0, getattr(self, f"fpn_output{level}")(prev))
        results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return dict(zip(self.out_features, results, strict=True))
