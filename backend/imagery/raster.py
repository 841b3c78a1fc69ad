"""Tiled TIFF / GeoTIFF / BigTIFF / COG rasters read window by window.

An orthomosaic of 40,000 x 40,000 px is 4.8 GB decoded: it is never decoded whole. The
raster is an array-like (`shape`, `raster[y0:y1, x0:x1]`) that the engine's tiling slices
like a decoded image; each slice reads and decodes only the TIFF tiles it touches, kept in a
small cache for the neighbouring, overlapping slices. Memory follows the tiles in flight,
not the raster.

Why tifffile and not rasterio/GDAL: tifffile is already how we read TIFF headers and deep
rasters, it is pure Python over numpy (no GDAL binary to match on a GPU machine or a
cluster), and its per-segment decoder (`TiffPage.decode`) is exactly the primitive a windowed
read needs. Codecs beyond zlib/deflate, LZMA and PackBits (JPEG, LZW, ZSTD, WebP: what
photogrammetry tools write) come with `imagecodecs`, a dependency; an installation without
it fails on such a file with an error naming it.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..imagery.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_SCALING,
    ImageError,
    PixelScaling,
    alpha_sample,
    array_to_rgb8,
    band_indices,
    gdal_nodata,
    internal_mask,
    is_tiff,
    load_image,
    value_percentiles,
)

if TYPE_CHECKING:
    import tifffile

_SAMPLE_TILES = 64  # TIFF tiles read to find a deep raster's stretch range


class WindowedRaster:
    """An (H, W, 3) uint8 RGB view of a tiled TIFF, decoded per window on demand."""

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, tif: tifffile.TiffFile, scaling: PixelScaling = DEFAULT_SCALING,
                 max_pixels: int = DEFAULT_MAX_PIXELS, cache_rows: int = 2) -> None:
        """Takes `tif` over (closes it)."""
        self.name = str(tif.filehandle.path)
        self.max_pixels = max_pixels
        self._tif = tif
        self._lock = threading.Lock()
        try:
            page = self._tif.pages[0]
            if not is_windowed(page):
                raise ImageError(self.name, "not a tiled, single-image TIFF")
            self._page = page
            self.shape = (page.imagelength, page.imagewidth, 3)
            self._tile_hw = (page.tilelength, page.tilewidth)
            self._grid = (math.ceil(page.imagelength / page.tilelength),
                          math.ceil(page.imagewidth / page.tilewidth))
            self._separate = page.planarconfig == 2
            samples = page.samplesperpixel
            try:
                self._bands = band_indices(samples, scaling.bands)
            except ValueError as exc:
                raise ImageError(self.name, str(exc)) from exc
            self._alpha = alpha_sample(page)
            mask = internal_mask(tif, page)
            if mask is not None and not (mask.is_tiled and (mask.tilelength, mask.tilewidth)
                                         == self._tile_hw):
                raise ImageError(self.name, "its internal mask is not tiled as the image is")
            self._mask = mask
            nodata = scaling.nodata if scaling.nodata is not None else gdal_nodata(page)
            self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
            planes = (len(self._bands) + (self._alpha is not None)) if self._separate else 1
            self._cache_size = max(8, cache_rows * self._grid[1] * (planes + (mask is not None)))
            self._scaling = dataclasses.replace(
                scaling, bands=None, nodata=nodata,
                value_range=scaling.value_range or self._sampled_range(scaling, nodata),
            )
        except BaseException:
            self._tif.close()
            raise

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        y0, y1, _ = rows.indices(self.shape[0])
        x0, x1, _ = cols.indices(self.shape[1])
        if (y1 - y0) * (x1 - x0) > self.max_pixels:
            raise ImageError(self.name, f"a {x1 - x0}x{y1 - y0} window exceeds the pixel limit "
                             f"of {self.max_pixels:,}: run this raster tiled (--tile-size)")
        window = self._read(y0, y1, x0, x1)
        values, valid = window[:, :, :-1], window[:, :, -1].astype(bool)
        return array_to_rgb8(values, self._scaling, self.name,
                             None if self._opaque else valid)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:, :]
        return whole if dtype is None else whole.astype(dtype)

    def close(self) -> None:
        self._tif.close()

    def __del__(self) -> None:  # a batch job drops rasters without closing them
        if hasattr(self, "_tif"):
            self._tif.close()

    def __enter__(self) -> WindowedRaster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _opaque(self) -> bool:
        return self._alpha is None and self._mask is None

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The chosen bands of [y0:y1, x0:x1] in the file's own dtype and, last, whether
        each pixel is valid (alpha and internal mask): (h, w, bands + 1)."""
        th, tw = self._tile_hw
        out = None
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self._tile_bands(ty, tx)
                if out is None:
                    out = np.empty((y1 - y0, x1 - x0, tile.shape[2]), tile.dtype)
                ty0, tx0 = ty * th, tx * tw
                sy0, sy1 = max(y0, ty0), min(y1, ty0 + th)
                sx0, sx1 = max(x0, tx0), min(x1, tx0 + tw)
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = tile[
                    sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0
                ]
        assert out is not None
        return out

    def _tile_bands(self, ty: int, tx: int) -> np.ndarray:
        """One TIFF tile's chosen bands and its validity (last), (th, tw, bands + 1)."""
        if self._separate:
            bands = np.concatenate([self._segment(self._page, b, ty, tx) for b in self._bands],
                                   axis=2)
        else:
            pixels = self._segment(self._page, 0, ty, tx)
            bands = pixels[:, :, self._bands]
        valid = np.ones(bands.shape[:2], bool)
        if self._alpha is not None:
            alpha = (self._segment(self._page, self._alpha, ty, tx) if self._separate
                     else pixels[:, :, self._alpha:self._alpha + 1])
            valid &= alpha[:, :, 0] > 0
        if self._mask is not None:
            valid &= self._segment(self._mask, 0, ty, tx)[:, :, 0].astype(bool)
        return np.concatenate([bands, valid[:, :, None].astype(bands.dtype)], axis=2)

    def _segment(self, page, plane: int, ty: int, tx: int) -> np.ndarray:
        """One decoded TIFF tile (tilelength, tilewidth, samples) of `page` (the image or
        its mask), from the cache if there."""
        key = (page.index, plane, ty, tx)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            index = (plane * self._grid[0] + ty) * self._grid[1] + tx
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            fh = self._tif.filehandle
            fh.seek(offset)
            data = fh.read(count) if count else None
        try:
            segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except (ValueError, NotImplementedError, KeyError) as exc:
            raise ImageError(self.name, f"TIFF tile {index} cannot be decoded ({exc}); "
                             "compressions beyond deflate need `pip install imagecodecs`") from exc
        if segment is None:  # an empty (sparse) tile
            segment = np.zeros((1, 1, *self._tile_hw, page.samplesperpixel if not
                                self._separate else 1), page.dtype)
        tile = segment.reshape(segment.shape[-3:])
        with self._lock:
            self._cache[key] = tile
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return tile

    def _sampled_range(self, scaling: PixelScaling, nodata: float | None
                       ) -> tuple[float, float] | None:
        """A deep raster's stretch range from TIFF tiles spread over it (8-bit data is not
        stretched): the percentiles of the whole, without decoding the whole. Only image
        pixels count: not the padding of tiles that cross the right or bottom edge, nor
        transparent or masked ones."""
        if self._page.dtype == np.uint8:
            return None
        rows, cols = self._grid
        (th, tw), (height, width) = self._tile_hw, self.shape[:2]
        picks = np.unique(np.linspace(0, rows * cols - 1, min(_SAMPLE_TILES, rows * cols))
                          .round().astype(int))
        values = []
        for pick in picks:
            ty, tx = divmod(int(pick), cols)
            tile = self._tile_bands(ty, tx)[: height - ty * th, : width - tx * tw]
            pixels = tile.reshape(-1, tile.shape[2])
            values.append(pixels[pixels[:, -1] != 0, :-1])
        return value_percentiles(np.concatenate(values), nodata, scaling.percentiles)


def is_windowed(page) -> bool:
    """A page read by windows: tiled, 2-D (no tile depth), stored upright (Orientation tag
    274 absent or 1)."""
    orientation = page.tags.get(274)
    return bool(page.is_tiled and page.imagedepth == 1 and page.tiledepth == 1
                and (orientation is None or orientation.value == 1))


def open_raster(path: str | Path, scaling: PixelScaling = DEFAULT_SCALING,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> WindowedRaster | None:
    """A windowed view of `path` if it is a local tiled TIFF, else None (decode it whole)."""
    import tifffile

    try:
        if not is_tiff(path):
            return None
        tif = tifffile.TiffFile(path)
    except (OSError, tifffile.TiffFileError):
        return None
    if not is_windowed(tif.pages[0]):
        tif.close()
        return None
    return WindowedRaster(tif, scaling, max_pixels)


def open_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
               scaling: PixelScaling = DEFAULT_SCALING) -> np.ndarray | WindowedRaster:
    """A local image file as the engine takes it: a tiled TIFF as a windowed raster (no
    pixel limit on the file, only on a window: memory follows the tiles read), anything
    else decoded whole, up to `max_pixels`."""
    raster = open_raster(path, scaling, max_pixels)
    return raster if raster is not None else load_image(path, max_pixels, scaling=scaling)
