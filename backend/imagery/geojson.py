"""Detections on the map: GeoJSON FeatureCollections with one polygon per detection in its
raster's CRS, with class, score, image and model version. Images without a georeference
are left out, and said so.

What a GIS reader gets right, and why the file looks as it does:
- One file per CRS. A FeatureCollection has one CRS for all its coordinates; rasters of a
  run in several CRSs (UTM zones 33 and 34, a national grid) are written to one file each,
  `NAME.<crs>.geojson` beside the asked-for name, and the log says so. Reprojecting into
  one CRS would need PROJ at run time; one file per CRS needs nothing and loses nothing.
- EPSG:4326 rasters give RFC 7946 output: longitude, latitude, no `crs` member (CRS84 is
  GeoJSON's only CRS; naming `urn:ogc:def:crs:EPSG::4326`, whose axes are latitude first,
  made strict readers swap the coordinates).
- Other CRSs are named in the 2008 GeoJSON `crs` member, which GDAL (QGIS, geopandas,
  ogr2ogr) reads: `urn:ogc:def:crs:EPSG::<code>`, or for a CRS with no EPSG code (a custom
  transverse Mercator, a local survey grid) its WKT, which GDAL reads there too. The WKT is
  built by GDAL from the GeoTIFF's keys (rasterio, `pip install 'tridentloop[geo]'`);
  without it such rasters go to a file of their own with a warning naming the fix, rather
  than into a file whose readers would take metres for degrees.
- Exterior rings are counter-clockwise (RFC 7946), whatever the raster's orientation.
Hand-written JSON rather than a GeoPackage through GDAL: the writer needs no GDAL, and the
readers users open it with are GDAL-based and read the `crs` member as written here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..files import write_atomically
from .georeference import WGS84, Georeference, read_georeference
from .records import class_names

log = logging.getLogger(__name__)

UNKNOWN_CRS = "unknown-crs"


def documents(
    records: Sequence[dict[str, Any]],
    labels: list[str] | None,
    detector: str,
    georeference_of: Callable[[str], Georeference | None] = read_georeference,
) -> dict[str | None, dict[str, Any]]:
    """One FeatureCollection per CRS (None: a georeference whose CRS could not be named)."""
    names = class_names(labels, records)
    collections: dict[str | None, dict[str, Any]] = {}
    unplaced = []
    for record in records:
        if "error" in record:
            continue
        where = georeference_of(record["image"])
        if where is None:
            unplaced.append(record["image"])
            continue
        collection = collections.setdefault(where.crs, _collection(where.crs))
        collection["features"] += [_feature(d, where, names, record["image"], detector)
                                   for d in record["detections"]]
    if unplaced:
        log.warning("GeoJSON: %d image(s) have no georeference and are left out, e.g. %s",
                    len(unplaced), unplaced[0])
    return collections


def write(path: Path, records: Sequence[dict[str, Any]], labels: list[str] | None,
          detector: str) -> list[Path]:
    """`path` when every raster shares one CRS (or none is georeferenced: an empty
    collection); else one file per CRS beside it. Returns the files written."""
    collections = documents(records, labels, detector)
    if len(collections) <= 1 and None not in collections:
        only = next(iter(collections.values()), _collection(WGS84))
        write_atomically(path, json.dumps(only) + "\n")
        return [path]
    written = []
    for crs, collection in collections.items():
        target = path.with_name(f"{path.stem}.{_tag(crs)}{path.suffix}")
        write_atomically(target, json.dumps(collection) + "\n")
        written.append(target)
    if None in collections:
        log.warning("GeoJSON: some rasters have a CRS without an EPSG code and rasterio is "
                    "not installed to read it: their features are in %s without a CRS "
                    "(pip install 'tridentloop[geo]' and run again)",
                    path.with_name(f"{path.stem}.{UNKNOWN_CRS}{path.suffix}"))
    if len(collections) > 1:
        log.warning("GeoJSON: the rasters are in %d CRSs; one file per CRS: %s",
                    len(collections), ", ".join(str(p) for p in written))
    return written


def _collection(crs: str | None) -> dict[str, Any]:
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": []}
    if crs is not None and crs != WGS84:
        name = (f"urn:ogc:def:crs:EPSG::{crs.split(':')[1]}" if crs.startswith("EPSG:")
                else crs)
        collection["crs"] = {"type": "name", "properties": {"name": name}}
    return collection


def _tag(crs: str | None) -> str:
    """A file-name tag for a CRS: epsg32633, a short hash of a WKT, or unknown-crs."""
    if crs is None:
        return UNKNOWN_CRS
    if crs.startswith("EPSG:"):
        return "epsg" + crs.split(":")[1]
    return "crs-" + hashlib.sha256(crs.encode()).hexdigest()[:8]


def _feature(detection: dict[str, Any], where: Georeference, names: list[str], image: str,
             detector: str) -> dict[str, Any]:
    x0, y0, x1, y1 = detection["box"]
    ring = [where.to_map(x, y) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))]
    if _signed_area(ring) < 0:
        ring.reverse()
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in ring]]},
        "properties": {"class": names[detection["class_id"]], "class_id": detection["class_id"],
                       "score": round(float(detection["score"]), 4), "image": image,
                       "model_version": detector},
    }


def _signed_area(ring: list[tuple[float, float]]) -> float:
    """Positive for a counter-clockwise ring (shoelace formula)."""
    return sum(xa * yb - xb * ya for (xa, ya), (xb, yb) in itertools.pairwise(ring))
