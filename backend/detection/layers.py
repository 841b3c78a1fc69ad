"""Building blocks shared by backbones and heads: frozen batch norm and conv + norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine terms, as detectron2 checkpoints store it.

    The buffers start as an exact identity (`running_var = 1 - eps`) so that a checkpoint
    without statistics, such as Caffe2's ImageNet backbones, behaves as a pure affine layer.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            # F.batch_norm's backward would also compute gradients for the frozen terms.
            scale, shift = self.scale_and_shift()
            return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class ConvNorm(nn.Conv2d):
    """A bias-free conv followed by FrozenBN, named `conv.weight` / `conv.norm.*` as in
    detectron2 checkpoints."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        self.norm = FrozenBatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))

    def forward_dilated(self, x: torch.Tensor, dilation: int) -> torch.Tensor:
        """Run the same weights at another dilation (padding follows), as trident branches do."""
        out = F.conv2d(x, self.weight, None, self.stride, dilation, dilation, self.groups)
        return self.norm(out)


def c2_msra_init(module: nn.Conv2d) -> None:
    """detectron2's default init for backbone convs trained from scratch."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def c2_xavier_init(module: nn.Conv2d) -> None:
    """detectron2's init for FPN convs (Caffe2's XavierFill)."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
