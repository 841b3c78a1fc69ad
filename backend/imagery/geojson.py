"""Detections on the map: a GeoJSON FeatureCollection with one polygon per detection in
its raster's CRS (named, since GIS tools need it to place non-WGS84 coordinates), with
class, score, image and model version. Images without a georeference are left out, and
said so."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..files import write_atomically
from .georeference import Georeference, read_georeference
from .records import class_names

log = logging.getLogger(__name__)


def document(
    records: Sequence[dict[str, Any]],
    labels: list[str] | None,
    detector: str,
    georeference_of: Callable[[str], Georeference | None] = read_georeference,
) -> dict[str, Any]:
    names = class_names(labels, records)
    features, crs, unplaced = [], set(), []
    for record in records:
        if "error" in record:
            continue
        where = georeference_of(record["image"])
        if where is None:
            unplaced.append(record["image"])
            continue
        crs.add(where.crs)
        features += [_feature(d, where, names, record["image"], detector)
                     for d in record["detections"]]
    if unplaced:
        log.warning("GeoJSON: %d image(s) have no georeference and are left out, e.g. %s",
                    len(unplaced), unplaced[0])
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if len(crs) == 1 and None not in crs:
        code = next(iter(crs)).split(":")[1]
        collection["crs"] = {"type": "name",
                             "properties": {"name": f"urn:ogc:def:crs:EPSG::{code}"}}
    return collection


def write(path: Path, records: Sequence[dict[str, Any]], labels: list[str] | None,
          detector: str) -> None:
    write_atomically(path, json.dumps(document(records, labels, detector)) + "\n")


def _feature(detection: dict[str, Any], where: Georeference, names: list[str], image: str,
             detector: str) -> dict[str, Any]:
    x0, y0, x1, y1 = detection["box"]
    ring = [where.to_map(x, y) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))]
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in ring]]},
        "properties": {"class": names[detection["class_id"]], "class_id": detection["class_id"],
                       "score": round(float(detection["score"]), 4), "image": image,
                       "model_version": detector, "crs": where.crs},
    }
