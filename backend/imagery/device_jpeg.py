"""JPEGs decoded where the model runs (`prelabel --decode device`).

A 6000 x 4000 survey JPEG costs a CPU core ~0.2 s to decode, then 54 crops of it cross to
the GPU: on a fast GPU that CPU side, not the model, limits the batch job. Decoded by
nvJPEG on the GPU (torchvision's `decode_jpeg`, the one JPEG decoder a CUDA torch install
already has), the compressed bytes cross instead (~10x fewer) and the crops are views of
a tensor already there. On a CPU device the same path runs torchvision's CPU decoder,
which is how the tests take it.

Only the decoding moves: the header is still read by PIL first (the pixel limit, EXIF
orientation, which nvJPEG does not apply), and a JPEG the device decoder refuses is handed
to `load_image`, so it is decoded on the CPU or its error names the problem as before.
nvJPEG's inverse DCT is not libjpeg's: pixels may differ by a level or two from PIL's, so
`--exact` (detectron2's PIL decoding, bit for bit) does not go with it.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from .images import DEFAULT_SCALING, PixelScaling, load_image, read_header

JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(data: bytes) -> bool:
    return data[:3] == JPEG_MAGIC


def load_pixels(data: bytes, max_pixels: int, name: str,
                scaling: PixelScaling = DEFAULT_SCALING, jpeg_device: torch.device | None = None
                ) -> torch.Tensor | np.ndarray:
    """`load_image`, with a JPEG decoded on `jpeg_device` where the CPU path would give its
    pixels as they are: a `--value-range` or `--bands` to apply keeps it on the CPU."""
    as_is = scaling.value_range is None and scaling.bands is None
    if jpeg_device is not None and as_is and is_jpeg(data):
        return decode_on_device(data, jpeg_device, max_pixels, name)
    return load_image(data, max_pixels=max_pixels, name=name, scaling=scaling)


def decode_on_device(data: bytes, device: torch.device, max_pixels: int, name: str
                     ) -> torch.Tensor | np.ndarray:
    """An (H, W, 3) uint8 RGB image, upright per its EXIF orientation: a tensor on `device`,
    or, for a JPEG only the CPU path reads, the array `load_image` gives."""
    try:
        (width, height), orientation = read_header(data)
    except (OSError, SyntaxError, ValueError):
        return load_image(data, max_pixels, name)  # raises ImageError, naming the problem
    if width * height > max_pixels:
        return load_image(data, max_pixels, name)
    try:
        chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                          mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # e.g. a truncated file, or a JPEG nvJPEG does not support
        return load_image(data, max_pixels, name)
    return upright(chw.permute(1, 2, 0), orientation)


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """What PIL's `ImageOps.exif_transpose` does to an (H, W, C) image, as views where it
    can: EXIF orientations 2-8 are the flips and quarter turns a camera records."""
    if orientation in (5, 7):  # a transpose (5), or the other diagonal's (7)
        image = image.transpose(0, 1)
        return image.flip(0).flip(1) if orientation == 7 else image
    turns = {3: 2, 6: -1, 8: 1}.get(orientation)  # PIL's ROTATE_180, _270, _90
    if turns is not None:
        return torch.rot90(image, turns, dims=(0, 1))
    if orientation == 2:
        return image.flip(1)
    if orientation == 4:
        return image.flip(0)
    return image
