"""Decode image files into the RGB uint8 arrays the engine takes.

Survey data arrives as JPEG, PNG or TIFF/GeoTIFF, 8-, 12-, 16-bit or float, grey, RGB, RGBA
or multi-band, with EXIF orientation from cameras and GDAL nodata from GIS tools. Every
problem is raised as ImageError naming the file, so a batch job can report it and go on with
the other images.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PixelScaling:
    """How data deeper than 8 bits (12/16-bit, float, multi-band rasters) becomes RGB 0-255.

    By default the values are stretched between the 0.5th and 99.5th percentiles of the
    image's valid pixels, all chosen bands together so colours keep their balance: 12-bit
    data in a 16-bit file would be nearly black if divided by 65535, and a float raster has
    no fixed range at all. `value_range` fixes the range instead (e.g. 0 4095), the same for
    every image of a survey. Pixels equal to `nodata` (default: the file's GDAL_NODATA tag)
    or not finite, and pixels an alpha band or GDAL's internal mask marks transparent, are
    left out of the percentiles and come out black. `bands` picks bands,
    1-based as GDAL numbers them (one for grey, three for RGB); by default the first three
    (or the one). 8-bit images are never rescaled unless `value_range` says so."""

    value_range: Sequence[float] | None = None
    bands: Sequence[int] | None = None
    nodata: float | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        if self.value_range is not None:
            low, high = self.value_range
            if not low < high:
                raise ValueError(f"value range {low} {high}: the low end must be below the high")
        if self.bands is not None and (len(self.bands) not in (1, 3) or min(self.bands) < 1):
            raise ValueError(f"bands {list(self.bands)}: give one band or three, numbered from 1")


DEFAULT_SCALING = PixelScaling()


def load_image(
    source: ImageSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    scaling: PixelScaling = DEFAULT_SCALING,
) -> np.ndarray:
    """Read an image as an (H, W, 3) uint8 RGB array, upright per its EXIF orientation."""
    name = name or (str(source) if isinstance(source, str | Path) else "<bytes>")
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    _follow_our_pixel_limit(max_pixels)
    try:
        with warnings.catch_warnings():
            # Our limit, checked from the header before any decoding, is the one that holds.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(stream)
            except Image.UnidentifiedImageError:
                if not is_tiff(stream):  # PIL cannot open multi-band float TIFFs at all
                    raise
                return _tiff_to_rgb(stream, max_pixels, name, scaling)
            _check_size(image.size, max_pixels, name)
            if image.format == "TIFF" and (
                not _eight_bit_tiff(image) or _has_internal_mask(stream)
            ):
                return _tiff_to_rgb(stream, max_pixels, name, scaling)
            image = ImageOps.exif_transpose(image)
            return _to_rgb8(image, scaling, name)
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


def read_header(source: ImageSource) -> tuple[tuple[int, int], int]:
    """(width, height) as stored and the EXIF orientation (1: upright), from the header
    only: nothing is decoded."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return image.size, int(image.getexif().get(0x0112, 1))


def _check_size(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageError(
            name,
            f"{width}x{height} exceeds the pixel limit of {max_pixels:,} "
            "(raise --max-pixels if the image is genuine)",
        )


# PIL decodes these itself; deeper TIFFs go to tifffile, which also reads GDAL's nodata tag.
_EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LA")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # TIFF and BigTIFF


def _eight_bit_tiff(image: Image.Image) -> bool:
    """PIL opens a 16-bit RGB TIFF as 8-bit RGB (its high bytes): only true 8-bit TIFFs
    stay with PIL."""
    bits = image.tag_v2.get(258, (8,))  # BitsPerSample
    return image.mode in _EIGHT_BIT_MODES and all(b <= 8 for b in np.atleast_1d(bits))


def is_tiff(stream: str | Path | BinaryIO) -> bool:
    if isinstance(stream, str | Path):
        with open(stream, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    stream.seek(0)
    head = stream.read(4)
    stream.seek(0)
    return head in _TIFF_MAGIC


def _has_internal_mask(stream: str | Path | BinaryIO) -> bool:
    """Whether a TIFF carries GDAL's internal mask (PIL would ignore it)."""
    import tifffile

    if hasattr(stream, "seek"):
        stream.seek(0)  # type: ignore[union-attr]
    try:
        with tifffile.TiffFile(stream) as tif:
            return internal_mask(tif, tif.pages[0]) is not None
    finally:
        if hasattr(stream, "seek"):
            stream.seek(0)  # type: ignore[union-attr]


def _tiff_to_rgb(
    source: str | Path | BinaryIO, max_pixels: int, name: str, scaling: PixelScaling
) -> np.ndarray:
    import tifffile

    if hasattr(source, "seek"):
        source.seek(0)  # type: ignore[union-attr]
    with tifffile.TiffFile(source) as tif:
        page = tif.pages[0]
        _check_size((page.imagewidth, page.imagelength), max_pixels, name)
        nodata = scaling.nodata if scaling.nodata is not None else gdal_nodata(page)
        array = page.asarray()
        mask = internal_mask(tif, page)
        valid = mask.asarray().astype(bool) if mask is not None else None
    if array.ndim == 3 and page.planarconfig == 2:  # SEPARATE: (bands, H, W)
        array = np.moveaxis(array, 0, -1)
    alpha = alpha_sample(page)
    if alpha is not None:
        opaque = array[:, :, alpha] > 0
        valid = opaque if valid is None else valid & opaque
    return array_to_rgb8(array, dataclasses.replace(scaling, nodata=nodata), name, valid)


def gdal_nodata(page) -> float | None:
    """A TIFF page's GDAL_NODATA tag (42113, an ASCII number), if it has one."""
    tag = page.tags.get(42113)
    return float(str(tag.value).strip()) if tag is not None else None


def _to_rgb8(image: Image.Image, scaling: PixelScaling, name: str) -> np.ndarray:
    if image.mode not in _EIGHT_BIT_MODES:  # 16/32-bit integer or float grey
        return array_to_rgb8(np.asarray(image), scaling, name)
    valid = np.asarray(image.getchannel("A")) > 0 if image.mode in ("RGBA", "LA") else None
    if scaling.value_range is not None or scaling.bands is not None or valid is not None:
        return array_to_rgb8(np.asarray(image.convert("RGB")), scaling, name, valid)
    if image.mode != "RGB":
        image = image.convert("RGB")  # grey, palette, CMYK
    return np.ascontiguousarray(np.asarray(image))


def array_to_rgb8(
    array: np.ndarray, scaling: PixelScaling, name: str, valid: np.ndarray | None = None
) -> np.ndarray:
    """(H, W) or (H, W, B) pixels of any dtype -> (H, W, 3) uint8 RGB, per `scaling`;
    pixels where `valid` (H, W) is False (transparent, masked) come out black and stay out
    of the stretch, so the model never sees a mask's fill."""
    if array.ndim == 2:
        array = array[:, :, None]
    try:
        bands = array[:, :, band_indices(array.shape[2], scaling.bands)]
    except ValueError as exc:
        raise ImageError(name, str(exc)) from exc
    if bands.dtype != np.uint8 or scaling.value_range is not None:
        bands = _stretch(bands, scaling, valid)
    elif valid is not None:
        bands = np.where(valid[:, :, None], bands, np.uint8(0))
    if bands.shape[2] == 1:
        bands = np.repeat(bands, 3, axis=2)
    return np.ascontiguousarray(bands)


def alpha_sample(page) -> int | None:
    """The 0-based sample of a TIFF page that is alpha (ExtraSamples 1 or 2, as GDAL's
    ALPHA=YES writes it), if any."""
    extras = [int(e) for e in (page.extrasamples or ())]
    for i, kind in enumerate(extras):
        if kind in (1, 2):  # associated or unassociated alpha
            return page.samplesperpixel - len(extras) + i
    return None


def internal_mask(tif, page):
    """GDAL's internal mask of `page` (a later IFD flagged as a mask, same size; nonzero is
    valid), if the file has one."""
    for candidate in tif.pages[1:]:
        if candidate.is_mask and (candidate.imagelength, candidate.imagewidth) == (
            page.imagelength, page.imagewidth
        ):
            return candidate
    return None


def band_indices(count: int, bands: Sequence[int] | None) -> list[int]:
    """0-based bands to use of `count`: the asked ones, else the first three, or grey (a
    second band is grey's alpha)."""
    if bands is not None:
        if max(bands) > count:
            raise ValueError(f"band {max(bands)} asked for, but the image has {count}")
        return [b - 1 for b in bands]
    return [0] if count < 3 else [0, 1, 2]


def _stretch(bands: np.ndarray, scaling: PixelScaling, valid: np.ndarray | None) -> np.ndarray:
    """Linear map of [low, high] to [0, 255] in float32 (a mosaic's memory is what it is
    twice at most, not eight times), invalid pixels black."""
    values = bands.astype(np.float32)
    invalid = _invalid(bands, values, scaling.nodata)
    if valid is not None:
        invalid |= ~valid
    if scaling.value_range is not None:
        low, high = scaling.value_range
    else:  # about a million samples on a regular grid: the range of every pixel, cheaply
        step = max(1, int((values.shape[0] * values.shape[1] / 1e6) ** 0.5))
        sample = values[::step, ::step][~invalid[::step, ::step]]
        low, high = value_percentiles(sample, None, scaling.percentiles)
    values -= low
    values *= 255.0 / max(high - low, 1e-12)
    values[invalid] = 0
    np.clip(values, 0, 255, out=values)
    return np.rint(values, out=values).astype(np.uint8)


def _invalid(bands: np.ndarray, values: np.ndarray, nodata: float | None) -> np.ndarray:
    """Pixels with any band not finite or equal to nodata."""
    invalid = ~np.isfinite(values).all(axis=-1)
    if nodata is not None:
        invalid |= (bands == nodata).any(axis=-1)
    return invalid


def value_percentiles(
    values: np.ndarray, nodata: float | None, percentiles: tuple[float, float]
) -> tuple[float, float]:
    """The stretch range of (N, B) pixel values, invalid ones left out; never empty."""
    values = values.astype(np.float32, copy=False)
    valid = values[~_invalid(values, values, nodata)]
    if valid.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(valid, percentiles)
    return float(low), float(high) if high > low else float(low) + 1.0
