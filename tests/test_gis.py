"""Rasters as GDAL writes them (rasterio) and our outputs as GIS tools read them
(geopandas over GDAL): deep tiled rasters, alpha bands and internal masks, rasters in
several CRSs, a CRS without an EPSG code, EPSG:4326."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
geopandas = pytest.importorskip("geopandas")

from rasterio.crs import CRS  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402

from backend.imagery import geojson  # noqa: E402
from backend.imagery.images import load_image  # noqa: E402
from backend.imagery.raster import open_raster  # noqa: E402

CUSTOM = "+proj=tmerc +lat_0=0 +lon_0=15.5 +k=0.9996 +x_0=400000 +y_0=0 +ellps=GRS80 +units=m"


def gdal_raster(path, crs="EPSG:32633", transform=None, bands: int = 3, dtype="uint16",
                alpha=False, mask_columns: int = 0, fill: int = 0, size=(620, 900)):
    """A tiled (256 px), deflate GeoTIFF written by GDAL, values 850-2450 (a 12-bit sensor in
    16 bits, size not a multiple of the tile); the first `mask_columns` columns masked out
    (internal mask) or transparent (alpha band), holding `fill`."""
    height, width = size
    rng = np.random.default_rng(0)
    data = (rng.random((bands, height, width)) * 1600 + 850).astype(dtype)
    data[:, :, :mask_columns] = fill
    profile = dict(driver="GTiff", width=width, height=height, count=bands + alpha,
                   dtype=dtype, tiled=True, blockxsize=256, blockysize=256, compress="deflate",
                   crs=CRS.from_user_input(crs),
                   transform=transform or from_origin(500000, 4100000, 0.5, 0.5))
    if alpha:
        profile.update(photometric="RGB", alpha="YES")
    with rasterio.open(path, "w", **profile) as dataset:
        if alpha:
            opaque = np.full((1, height, width), np.iinfo(dtype).max, dtype)
            opaque[:, :, :mask_columns] = 0
            data = np.concatenate([data, opaque])
        dataset.write(data)
        if mask_columns and not alpha:
            valid = np.full((height, width), 255, np.uint8)
            valid[:, :mask_columns] = 0
            dataset.write_mask(valid)
    return path


def test_a_deep_tiled_raster_is_stretched_from_its_pixels_not_its_tiles_padding(tmp_path):
    """900 x 620 in 256 px tiles: the edge tiles' padding (zeros) is no pixel of the image."""
    raster = open_raster(gdal_raster(tmp_path / "deep.tif"))
    low, high = raster._scaling.value_range
    assert 850 <= low < 870 and 2430 < high <= 2450
    assert np.array_equal(np.asarray(raster), load_image(tmp_path / "deep.tif"))


@pytest.mark.parametrize("how", ["internal-mask", "alpha"])
def test_masked_pixels_are_nodata_black_and_out_of_the_stretch(tmp_path, how):
    path = gdal_raster(tmp_path / f"{how}.tif", mask_columns=300, fill=7,
                       alpha=how == "alpha")
    whole, raster = load_image(path), open_raster(path)
    windowed = np.asarray(raster)
    assert np.array_equal(whole, windowed)
    assert (whole[:, :300] == 0).all() and whole[:, 300:].mean() > 60
    assert raster._scaling.value_range[0] >= 850  # the fill (7) did not set the low end
    eight_bit = gdal_raster(tmp_path / f"{how}8.tif", mask_columns=300, dtype="uint8",
                            fill=200, alpha=how == "alpha")
    assert (load_image(eight_bit)[:, :300] == 0).all()
    assert (np.asarray(open_raster(eight_bit))[:, :300] == 0).all()


def _detections(box=(20.0, 10.0, 60.0, 30.0)):
    return [{"box": list(box), "score": 0.9, "class_id": 0, "label": "zebra"}]


def _records(*paths):
    return [{"image": str(p), "width": 900, "height": 620, "detections": _detections()}
            for p in paths]


def test_rasters_in_several_crss_get_one_file_each_that_gis_tools_place_right(
    tmp_path, caplog
):
    a = gdal_raster(tmp_path / "a_utm33.tif", "EPSG:32633")
    b = gdal_raster(tmp_path / "b_utm34.tif", "EPSG:32634",
                    from_origin(300000, 5000000, 0.5, 0.5))
    c = gdal_raster(tmp_path / "c_4326.tif", "EPSG:4326", from_origin(16.0, 48.0, 1e-5, 1e-5))
    with caplog.at_level(logging.WARNING):
        written = geojson.write(tmp_path / "m.geojson", _records(a, b, c), ["zebra"], "v1")
    assert sorted(p.name for p in written) == [
        "m.epsg32633.geojson", "m.epsg32634.geojson", "m.epsg4326.geojson"]
    assert "3 CRSs" in caplog.text and not (tmp_path / "m.geojson").exists()
    for raster, name in ((a, "epsg32633"), (b, "epsg32634"), (c, "epsg4326")):
        frame = geopandas.read_file(tmp_path / f"m.{name}.geojson")
        with rasterio.open(raster) as dataset:
            assert frame.crs.equals(dataset.crs.to_wkt())
            corners = [dataset.transform @ xy for xy in ((20, 10), (60, 30))]
        (polygon,) = frame.geometry
        assert polygon.exterior.is_ccw
        (x0, y1), (x1, y0) = corners
        assert np.allclose(polygon.bounds, (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    wgs84 = json.loads((tmp_path / "m.epsg4326.geojson").read_text())
    assert "crs" not in wgs84  # RFC 7946: CRS84, longitude first
    lon, lat = wgs84["features"][0]["geometry"]["coordinates"][0][0]
    assert 16 < lon < 16.01 and 47.99 < lat < 48


def test_a_crs_without_an_epsg_code_is_written_as_gdal_reads_it(tmp_path):
    raster = gdal_raster(tmp_path / "grid.tif", CUSTOM)
    (written,) = geojson.write(tmp_path / "g.geojson", _records(raster), ["zebra"], "v1")
    assert written == tmp_path / "g.geojson"
    frame = geopandas.read_file(written)
    with rasterio.open(raster) as dataset:
        assert dataset.crs.to_epsg() is None
        assert frame.crs is not None and frame.crs.equals(dataset.crs.to_wkt())
        x, y = dataset.transform @ (20, 10)
    assert np.isclose(frame.geometry[0].bounds[0], x) and np.isclose(frame.geometry[0].bounds[3], y)


def test_without_rasterio_such_a_raster_goes_to_a_file_of_its_own_with_the_fix(
    tmp_path, monkeypatch, caplog
):
    import builtins

    real_import = builtins.__import__

    def no_rasterio(name, *args, **kwargs):
        if name == "rasterio":
            raise ImportError("no rasterio")
        return real_import(name, *args, **kwargs)

    raster = gdal_raster(tmp_path / "grid.tif", CUSTOM)
    monkeypatch.setattr(builtins, "__import__", no_rasterio)
    with caplog.at_level(logging.WARNING):
        (written,) = geojson.write(tmp_path / "g.geojson", _records(raster), ["zebra"], "v1")
    assert written.name == "g.unknown-crs.geojson"
    assert "pip install 'tridentloop[geo]'" in caplog.text
