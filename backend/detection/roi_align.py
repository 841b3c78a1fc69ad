"""ROIAlign that reads channels-last features in their own dtype and writes only the bins
the next layer reads, as one Triton kernel.

Measured on an H200 (TridentNet-Fast R50-C4, bf16, batch 16): torchvision's ROIAlign took
3.4 of 9.3 ms per tile. Its kernel wants fp32 NCHW (so the bf16 channels-last features are
converted first), gives one thread each output element (neighbouring threads read
neighbouring columns of one channel: scattered loads), computes all 14x14 bins of which
res5's strided 1x1 convs read 7x7, and its output needs one more pass to become bf16
channels-last. Here one program computes one bin of one ROI for a block of channels, which
lie side by side in channels-last memory (wide, coalesced loads), samples where
torchvision samples (same coordinates and weights in fp32, adaptive sampling grid), sums
in fp32 and stores the output dtype directly, channels-last.

`torchvision.ops.roi_align` stays the path wherever Triton is missing (CPU wheels on some
platforms) and the reference it is tested against; CPU tests run this kernel through
Triton's interpreter (TRITON_INTERPRET=1), so the code the GPU runs is also run in CI.

On the CPU, torchvision's kernel pools one ROI after another on one core (1,000 ROIs of a
256-channel map: 446 ms on 1 thread, 393 ms on 2) and releases the GIL while it runs, so
`roi_align_threads` gives each of torch's threads a share of the ROIs: the same kernel per
ROI, so the same output bit for bit, in 133-152 ms on this 2-core machine.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import torch
from torchvision.ops import roi_align

try:
    import triton
    import triton.language as tl
except ImportError:  # torch builds without Triton: torchvision's ROIAlign is used
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _roi_align_kernel(
        feature,  # (N, H, W, C) contiguous
        rois,  # (R, 5) fp32: image index, x0, y0, x1, y1
        out,  # (R, OH, OW, C) contiguous
        height,
        width,
        channels,
        scale,
        offset,
        min_size,
        POOLED_H: tl.constexpr,
        POOLED_W: tl.constexpr,
        OUT_H: tl.constexpr,
        OUT_W: tl.constexpr,
        STEP: tl.constexpr,
        SAMPLING: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        pid = tl.program_id(0)
        roi = pid // (OUT_H * OUT_W)
        ph = (pid // OUT_W) % OUT_H * STEP
        pw = pid % OUT_W * STEP
        cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_range = cs < channels
        image = tl.load(rois + roi * 5).to(tl.int64)
        x0 = tl.load(rois + roi * 5 + 1) * scale - offset
        y0 = tl.load(rois + roi * 5 + 2) * scale - offset
        roi_w = tl.maximum(tl.load(rois + roi * 5 + 3) * scale - offset - x0, min_size)
        roi_h = tl.maximum(tl.load(rois + roi * 5 + 4) * scale - offset - y0, min_size)
        bin_h = roi_h / POOLED_H
        bin_w = roi_w / POOLED_W
        if SAMPLING > 0:
            grid_h = SAMPLING
            grid_w = SAMPLING
        else:
            grid_h = tl.ceil(roi_h / POOLED_H).to(tl.int32)
            grid_w = tl.ceil(roi_w / POOLED_W).to(tl.int32)
        count = tl.maximum(grid_h * grid_w, 1).to(tl.float32)
        base = feature + image * height * width * channels + cs
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for iy in range(grid_h):
            y = y0 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
            for ix in range(grid_w):
                x = x0 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                inside = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
                yc = tl.minimum(tl.maximum(y, 0.0), height)
                xc = tl.minimum(tl.maximum(x, 0.0), width)
                y_low = yc.to(tl.int32)
                x_low = xc.to(tl.int32)
                top = y_low >= height - 1
                right = x_low >= width - 1
                y_low = tl.where(top, height - 1, y_low)
                x_low = tl.where(right, width - 1, x_low)
                y_high = tl.where(top, y_low, y_low + 1)
                x_high = tl.where(right, x_low, x_low + 1)
                yc = tl.where(top, y_low.to(tl.float32), yc)
                xc = tl.where(right, x_low.to(tl.float32), xc)
                ly = yc - y_low
                lx = xc - x_low
                hy = 1.0 - ly
                hx = 1.0 - lx
                w1 = hy * hx
                w2 = hy * lx
                w3 = ly * hx
                w4 = ly * lx
                # Clamped indices stay inside the map: every load is valid, and a sample
                # outside the feature map adds exactly 0, as in torchvision.
                v1 = tl.load(base + (y_low * width + x_low).to(tl.int64) * channels,
                             mask=in_range, other=0.0).to(tl.float32)
                v2 = tl.load(base + (y_low * width + x_high).to(tl.int64) * channels,
                             mask=in_range, other=0.0).to(tl.float32)
                v3 = tl.load(base + (y_high * width + x_low).to(tl.int64) * channels,
                             mask=in_range, other=0.0).to(tl.float32)
                v4 = tl.load(base + (y_high * width + x_high).to(tl.int64) * channels,
                             mask=in_range, other=0.0).to(tl.float32)
                acc += tl.where(inside, w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4, 0.0)
        target = out + (pid.to(tl.int64) * channels) + cs
        tl.store(target, (acc / count).to(out.dtype.element_ty), mask=in_range)


def roi_align_channels_last(
    feature: torch.Tensor,
    rois: torch.Tensor,
    output_size: tuple[int, int],
    scale: float,
    sampling_ratio: int,
    aligned: bool,
    step: int = 1,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """torchvision's `roi_align(feature, rois, output_size, scale, sampling_ratio,
    aligned)[:, :, ::step, ::step]`, computed from `feature` (N, C, H, W) in its own dtype
    and returned as a channels-last (R, C, OH, OW) tensor of `dtype` (the feature's by
    default)."""
    if triton is None:
        raise RuntimeError("ROIAlign in Triton needs the triton package (pip install triton)")
    _, channels, height, width = feature.shape
    nhwc = feature.permute(0, 2, 3, 1).contiguous()  # no copy when already channels-last
    out_h, out_w = -(-output_size[0] // step), -(-output_size[1] // step)
    out = torch.empty((rois.shape[0], out_h, out_w, channels), device=feature.device,
                      dtype=dtype or feature.dtype)
    block = min(1024, triton.next_power_of_2(channels))
    if rois.shape[0] > 0:
        grid = (rois.shape[0] * out_h * out_w, triton.cdiv(channels, block))
        _roi_align_kernel[grid](
            nhwc, rois.float().contiguous(), out, height, width, channels, float(scale),
            0.5 if aligned else 0.0, -3.0e38 if aligned else 1.0,
            POOLED_H=output_size[0], POOLED_W=output_size[1], OUT_H=out_h, OUT_W=out_w,
            STEP=step, SAMPLING=sampling_ratio, BLOCK_C=block, num_warps=4,
        )
    return out.permute(0, 3, 1, 2)


MIN_SHARE = 32  # ROIs below which another thread costs more than it saves


@functools.cache
def _workers(count: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(count, thread_name_prefix="roi-align")


def roi_align_threads(
    feature: torch.Tensor,
    rois: torch.Tensor,
    output_size: tuple[int, int],
    scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """torchvision's `roi_align`, the ROIs shared among torch's intra-op threads."""
    shares = min(torch.get_num_threads(), rois.shape[0] // MIN_SHARE)
    if shares < 2:
        return roi_align(feature, rois, output_size, scale, sampling_ratio, aligned)
    pooled = _workers(shares).map(
        lambda part: roi_align(feature, part, output_size, scale, sampling_ratio, aligned),
        rois.tensor_split(shares),
    )
    return torch.cat(list(pooled))
