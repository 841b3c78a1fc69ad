"""Decode image files into the RGB uint8 arrays the engine takes.

Survey data arrives as JPEG, PNG or TIFF, 8- or 16-bit, grey, RGB or RGBA, with EXIF
orientation from cameras. Every problem is raised as ImageError naming the file, so a batch
job can report it and go on with the other images.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

# 600 megapixels: a 20,000 x 30,000 survey mosaic fits, a decompression bomb does not.
DEFAULT_MAX_PIXELS = 600_000_000

ImageSource = str | Path | bytes | BinaryIO


class ImageError(ValueError):
    """An image that cannot be used, with the file it came from."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def load_image(
    source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> np.ndarray:
    """Read an image as an (H, W, 3) uint8 RGB array, upright per its EXIF orientation."""
    name = name or (str(source) if isinstance(source, str | Path) else "<bytes>")
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    _follow_our_pixel_limit(max_pixels)
    try:
        with warnings.catch_warnings():
            # Our limit, checked from the header before any decoding, is the one that holds.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
            _check_size(image.size, max_pixels, name)
            if image.format == "TIFF" and _needs_tifffile(image):
                return _tiff_to_rgb(
                    stream if not isinstance(stream, str | Path) else source, max_pixels, name
                )
            image = ImageOps.exif_transpose(image)
            return _to_rgb8(image)
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError(name, "file not found") from exc
    except IsADirectoryError as exc:
        raise ImageError(name, "is a directory, not an image") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageError(name, "not an image file PIL or tifffile can read") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(name, f"exceeds the pixel limit of {max_pixels:,}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(name, f"cannot be decoded ({exc}); the file may be truncated") from exc


def _follow_our_pixel_limit(max_pixels: int) -> None:
    """PIL refuses images over twice its own limit (179 MP by default) before we can check
    ours: raise its limit to ours, never lower it (it is process-wide, and other threads may
    be reading with a larger limit)."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def image_size(source: ImageSource) -> tuple[int, int]:
    """(width, height) as shown, read from the header only."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _check_size(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageError(
            name,
            f"{width}x{height} exceeds the pixel limit of {max_pixels:,} "
            "(raise --max-pixels if the image is genuine)",
        )


def _needs_tifffile(image: Image.Image) -> bool:
    """PIL cannot decode multi-channel 16-bit or float TIFFs; tifffile can."""
    return image.mode not in (
        "1",
        "L",
        "P",
        "RGB",
        "RGBA",
        "CMYK",
        "YCbCr",
        "LA",
        "I;16",
        "I;16B",
        "I;16L",
        "I",
    )


def _tiff_to_rgb(source: ImageSource, max_pixels: int, name: str) -> np.ndarray:
    import tifffile

    if hasattr(source, "seek"):
        source.seek(0)  # type: ignore[union-attr]
    array = tifffile.imread(source)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    _check_size((array.shape[1], array.shape[0]), max_pixels, name)
    return _array_to_rgb8(array)


def _to_rgb8(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _array_to_rgb8(np.asarray(image))
    if image.mode != "RGB":
        image = image.convert("RGB")  # grey, palette, CMYK; RGBA drops its alpha
    return np.ascontiguousarray(np.asarray(image))


def _array_to_rgb8(array: np.ndarray) -> np.ndarray:
    """Scale integer data by its type's full range (16-bit: /257) and floats from [0, 1]."""
    if array.dtype == np.uint8:
        scaled = array
    elif np.issubdtype(array.dtype, np.integer):
        scaled = (array.astype(np.float64) * (255.0 / np.iinfo(array.dtype).max)).round()
        scaled = np.clip(scaled, 0, 255).astype(np.uint8)
    else:
        scaled = np.clip(np.nan_to_num(array.astype(np.float64)) * 255.0, 0, 255).round()
        scaled = scaled.astype(np.uint8)
    if scaled.ndim == 2:
        scaled = scaled[:, :, None]
    channels = scaled.shape[2]
    if channels == 1:
        scaled = np.repeat(scaled, 3, axis=2)
    elif channels == 2:  # grey + alpha
        scaled = np.repeat(scaled[:, :, :1], 3, axis=2)
    else:
        scaled = scaled[:, :, :3]
    return np.ascontiguousarray(scaled)
