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
    detectron2 checkpoints.

    For inference the norm can be folded into the convolution (`fold_norm`): weight times
    scale, shift as the bias, so that the norm's pass over the activations disappears (the
    CPU's convolution adds the bias in its own kernel). The folded tensors are buffers kept
    out of the state dict, so checkpoints keep detectron2's layout; switching to training
    drops them. Folding rounds differently from conv-then-norm: `fold_norm` is an option
    (`DeviceOptions.fold_norms`) and the unfolded path stays detectron2's exact order.
    """

    folded_weight: torch.Tensor | None
    folded_bias: torch.Tensor | None

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
        self.register_buffer("folded_weight", None, persistent=False)
        self.register_buffer("folded_bias", None, persistent=False)

    def forward(
        self, x: torch.Tensor, dilation: int | None = None, stride: int | None = None
    ) -> torch.Tensor:
        """The conv and its norm; `dilation` (padding follows) runs the same weights at
        another dilation, as trident branches do; `stride` overrides the stride."""
        padding = self.padding if dilation is None else (dilation, dilation)
        dilated = self.dilation if dilation is None else (dilation, dilation)
        strided = self.stride if stride is None else (stride, stride)
        if self.folded_weight is not None:
            return F.conv2d(
                x, self.folded_weight, self.folded_bias, strided, padding, dilated, self.groups
            )
        return self.norm(F.conv2d(x, self.weight, None, strided, padding, dilated, self.groups))

    @torch.no_grad()
    def fold_norm(self) -> None:
        scale, shift = self.norm.scale_and_shift()
        self.folded_weight = self.weight * scale.view(-1, 1, 1, 1)
        self.folded_bias = shift.clone()

    def unfold_norm(self) -> None:
        self.folded_weight = self.folded_bias = None

    def train(self, mode: bool = True) -> ConvNorm:
        if mode:
            self.unfold_norm()
        return super().train(mode)


def set_norms_folded(model: nn.Module, folded: bool) -> None:
    """Fold every ConvNorm's frozen norm into its convolution (those not folded yet), or
    undo it: a model is run folded or not by whichever predictor wraps it last."""
    for conv in model.modules():
        if isinstance(conv, ConvNorm) and folded != (conv.folded_weight is not None):
            conv.fold_norm() if folded else conv.unfold_norm()


def share_folded_norms(source: nn.Module, target: nn.Module) -> None:
    """Give `target`, a model of the same layers over the same weights, `source`'s folded
    tensors rather than a second copy of them."""
    pairs = zip(
        (m for m in source.modules() if isinstance(m, ConvNorm)),
        (m for m in target.modules() if isinstance(m, ConvNorm)),
        strict=True,
    )
    for a, b in pairs:
        b.folded_weight, b.folded_bias = a.folded_weight, a.folded_bias


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
