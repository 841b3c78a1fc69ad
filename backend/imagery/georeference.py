"""Where a raster's pixels lie on the map: the GeoTIFF tags, read by tifffile from the
header only (no pixels decoded), as one affine transform and the CRS: its EPSG code, or
for a CRS the keys define without one, its WKT as GDAL builds it from them (rasterio, the
optional `geo` extra; libgeotiff's mapping of keys to CRSs is not ours to redo)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

_USER_DEFINED = 32767  # a GeoKey value meaning "not an EPSG code"
WGS84 = "EPSG:4326"


@dataclass(frozen=True)
class Georeference:
    """Our pixel coordinates (x right, y down, (0, 0) the top-left corner of the top-left
    pixel) -> map coordinates: X = a*x + b*y + c, Y = d*x + e*y + f."""

    affine: tuple[float, float, float, float, float, float]
    crs: str | None  # "EPSG:32633", or a WKT; None when it cannot be named

    def to_map(self, x: float, y: float) -> tuple[float, float]:
        a, b, c, d, e, f = self.affine
        return a * x + b * y + c, d * x + e * y + f


def read_georeference(uri: str) -> Georeference | None:
    """The georeference of a GeoTIFF (a path or any fsspec URL); None for anything else."""
    import tifffile

    try:
        with fsspec.open(uri, "rb") as stream, tifffile.TiffFile(stream) as tif:
            metadata = tif.geotiff_metadata if tif.is_geotiff else None
    except (OSError, ValueError, tifffile.TiffFileError):
        return None
    where = from_geotiff_metadata(metadata) if metadata else None
    if where is not None and where.crs is None and _defines_a_crs(metadata):
        return Georeference(where.affine, _wkt_from_gdal(uri))
    return where


def from_geotiff_metadata(metadata: dict[str, Any]) -> Georeference | None:
    if "ModelTransformation" in metadata:
        m = np.asarray(metadata["ModelTransformation"], dtype=float).reshape(4, 4)
        affine = (m[0, 0], m[0, 1], m[0, 3], m[1, 0], m[1, 1], m[1, 3])
    elif "ModelTiepoint" in metadata and "ModelPixelScale" in metadata:
        i, j, _, x, y, _ = np.asarray(metadata["ModelTiepoint"], dtype=float)[:6]
        sx, sy = np.asarray(metadata["ModelPixelScale"], dtype=float)[:2]
        affine = (sx, 0.0, x - i * sx, 0.0, -sy, y + j * sy)
    else:
        return None
    a, b, c, d, e, f = (float(v) for v in affine)
    if int(metadata.get("GTRasterTypeGeoKey", 1)) == 2:
        # PixelIsPoint: the tags' raster coordinates are pixel centres, ours are corners.
        c, f = c - 0.5 * (a + b), f - 0.5 * (d + e)
    return Georeference((a, b, c, d, e, f), _epsg(metadata))


def _crs_key(metadata: dict[str, Any]) -> str:
    """The key naming the CRS of the model type: a projected CRS is named by its own key
    alone (its base geographic CRS, often EPSG:4326, is not the raster's CRS)."""
    projected = int(metadata.get("GTModelTypeGeoKey", 1)) == 1
    return "ProjectedCSTypeGeoKey" if projected else "GeographicTypeGeoKey"


def _epsg(metadata: dict[str, Any]) -> str | None:
    code = int(metadata.get(_crs_key(metadata), 0))
    return f"EPSG:{code}" if 0 < code < _USER_DEFINED else None


def _defines_a_crs(metadata: dict[str, Any]) -> bool:
    return int(metadata.get(_crs_key(metadata), 0)) == _USER_DEFINED


def _wkt_from_gdal(uri: str) -> str | None:
    """The WKT of a user-defined CRS, as GDAL reads the GeoTIFF's keys; None without
    rasterio (the GeoJSON writer then says what to install)."""
    try:
        import rasterio
    except ImportError:
        return None
    opener = None if "://" not in uri else (lambda path, mode: fsspec.open(path, mode).open())
    try:
        with rasterio.open(uri, opener=opener) as dataset:
            if not dataset.crs:
                return None
            code = dataset.crs.to_epsg()  # GDAL may recognise the keys as an EPSG CRS
            return f"EPSG:{code}" if code else dataset.crs.to_wkt()
    except rasterio.errors.RasterioError:
        return None
