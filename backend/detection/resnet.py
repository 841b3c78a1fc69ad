"""ResNet backbones in detectron2's layout: stem, res2..res5 stages of bottleneck blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ResNetConfig, TridentConfig
from .layers import ConvNorm, c2_msra_init
from .trident import TridentStage

BLOCKS_PER_STAGE = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STAGE_NAMES = ("res2", "res3", "res4", "res5")


class Stem(nn.Module):
    """7x7 stride-2 conv, ReLU, 3x3 stride-2 max pool: stride 4 in all."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(3, out_channels, kernel_size=7, stride=2, padding=3)
        c2_msra_init(self.conv1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu_(self.conv1(x)), kernel_size=3, stride=2, padding=1)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 residual block; the stride sits on the first 1x1 when
    `stride_in_1x1` (MSRA weights) and on the 3x3 otherwise (torchvision weights)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bottleneck_channels: int,
        stride: int,
        num_groups: int,
        stride_in_1x1: bool,
        dilation: int,
    ) -> None:
        super().__init__()
        self.shortcut = (
            ConvNorm(in_channels, out_channels, 1, stride=stride)
            if in_channels != out_channels
            else None
        )
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = ConvNorm(in_channels, bottleneck_channels, 1, stride=stride_1x1)
        self.conv2 = ConvNorm(
            bottleneck_channels,
            bottleneck_channels,
            3,
            stride=stride_3x3,
            padding=dilation,
            dilation=dilation,
            groups=num_groups,
        )
        self.conv3 = ConvNorm(bottleneck_channels, out_channels, 1)
        self.dilation = dilation
        for conv in (self.conv1, self.conv2, self.conv3, self.shortcut):
            if conv is not None:
                c2_msra_init(conv)

    @property
    def strides_1x1_only(self) -> bool:
        """Whether the block's stride sits on 1x1 convs alone (MSRA weights): then it reads
        only every other row and column of its input, and may be given just those."""
        return self.conv1.stride[0] > 1

    def forward(
        self, x: torch.Tensor, dilation: int | None = None, presampled: bool = False
    ) -> torch.Tensor:
        """The block, with its 3x3 conv at `dilation` if given (a trident branch shares
        every weight); `presampled`: `x` is already the strided 1x1 convs' input
        `x[..., ::s, ::s]` (only when `strides_1x1_only`), so they run at stride 1."""
        stride = 1 if presampled else None
        out = F.relu_(self.conv1(x, stride=stride))
        out = F.relu_(self.conv2(out, dilation=dilation or self.dilation))
        out = self.conv3(out)
        out += x if self.shortcut is None else self.shortcut(x, stride=stride)
        return F.relu_(out)


class Stage(nn.Sequential):
    """Bottleneck blocks in sequence; `presampled` goes to the first (see Bottleneck)."""

    def forward(self, x: torch.Tensor, presampled: bool = False) -> torch.Tensor:
        for i, block in enumerate(self):
            x = block(x, presampled=presampled and i == 0)
        return x


def make_stage(
    num_blocks: int,
    first_stride: int,
    in_channels: int,
    bottleneck_channels: int,
    out_channels: int,
    num_groups: int,
    stride_in_1x1: bool,
    dilation: int,
) -> Stage:
    blocks = []
    for i in range(num_blocks):
        blocks.append(
            Bottleneck(
                in_channels if i == 0 else out_channels,
                out_channels,
                bottleneck_channels,
                first_stride if i == 0 else 1,
                num_groups,
                stride_in_1x1,
                dilation,
            )
        )
    return Stage(*blocks)


def stage_widths(cfg: ResNetConfig, stage_index: int) -> tuple[int, int, int]:
    """(in, bottleneck, out) channels of stage `stage_index` (2 for res2 ... 5 for res5)."""
    factor = 2 ** (stage_index - 2)
    out_channels = cfg.res2_out_channels * factor
    in_channels = cfg.stem_out_channels if stage_index == 2 else out_channels // 2
    return in_channels, cfg.num_groups * cfg.width_per_group * factor, out_channels


class ResNet(nn.Module):
    """Stem plus the stages up to the deepest requested output; `res4` may be a trident
    stage, which turns a batch of N images into num_branch * N feature maps."""

    def __init__(self, cfg: ResNetConfig, trident: TridentConfig | None = None) -> None:
        super().__init__()
        if cfg.depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"ResNet depth {cfg.depth} is not supported (50, 101, 152)")
        self.out_features = cfg.out_features
        self.stem = Stem(cfg.stem_out_channels)
        self.stage_names: list[str] = []
        self.out_channels: dict[str, int] = {}
        self.strides: dict[str, int] = {}
        last = max(STAGE_NAMES.index(name) for name in cfg.out_features) + 2
        stride = 4
        for index in range(2, last + 1):
            name = f"res{index}"
            dilation = cfg.res5_dilation if index == 5 else 1
            first_stride = 1 if index == 2 or (index == 5 and dilation == 2) else 2
            stride *= first_stride
            in_ch, bottleneck_ch, out_ch = stage_widths(cfg, index)
            stage = make_stage(
                BLOCKS_PER_STAGE[cfg.depth][index - 2],
                first_stride,
                in_ch,
                bottleneck_ch,
                out_ch,
                cfg.num_groups,
                cfg.stride_in_1x1,
                dilation,
            )
            if trident is not None and name == trident.trident_stage:
                stage = TridentStage(stage, trident)
            self.add_module(name, stage)
            self.stage_names.append(name)
            self.out_channels[name] = out_ch
            self.strides[name] = stride
        self.freeze(cfg.freeze_at)

    @property
    def size_divisibility(self) -> int:
        return 0

    def freeze(self, freeze_at: int) -> None:
        """Stop gradients into the stem (freeze_at >= 1) and stages res2..res{freeze_at}."""
        frozen: list[nn.Module] = [self.stem] if freeze_at >= 1 else []
        frozen += [getattr(self, n) for i, n in enumerate(self.stage_names, 2) if freeze_at >= i]
        for module in frozen:
            for param in module.parameters():
                param.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = {}
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.out_features:
                outputs[name] = x
        return outputs
