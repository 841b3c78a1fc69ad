"""Where a raster's pixels lie on the map: the GeoTIFF tags, read by tifffile from the
header only (no pixels decoded), as one affine transform and the CRS's EPSG code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

_USER_DEFINED = 32767  # a GeoKey value meaning "not an EPSG code"


@dataclass(frozen=True)
class Georeference:
    """Our pixel coordinates (x right, y down, (0, 0) the top-left corner of the top-left
    pixel) -> map coordinates: X = a*x + b*y + c, Y = d*x + e*y + f."""

    affine: tuple[float, float, float, float, float, float]
    crs: str | None  # "EPSG:32633"; None when the file names no EPSG code

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
    return from_geotiff_metadata(metadata) if metadata else None


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


def _epsg(metadata: dict[str, Any]) -> str | None:
    for key in ("ProjectedCSTypeGeoKey", "GeographicTypeGeoKey"):
        if key in metadata and 0 < int(metadata[key]) < _USER_DEFINED:
            return f"EPSG:{int(metadata[key])}"
    return None
