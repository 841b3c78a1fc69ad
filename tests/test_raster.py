"""Tiled TIFF / GeoTIFF rasters are read window by window: the pixels are those of the
whole decode, memory follows the windows, detections equal those on the decoded image,
and a raster too large to decode whole still runs tiled."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import tifffile
from PIL import Image

from backend.bench.raster import RasterBench, run_raster_benchmark, write_mosaic
from backend.cli import main as cli
from backend.imagery.images import ImageError, PixelScaling, load_image
from backend.imagery.raster import WindowedRaster, open_image, open_raster

from .conftest import run_predict_cli

FPN = "faster_rcnn_R_50_FPN_1x"


def test_windows_hold_the_pixels_of_the_whole_decode(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)
    path = tmp_path / "ortho.tif"
    tifffile.imwrite(path, image, tile=(64, 64), compression="zlib", photometric="rgb")
    raster = open_raster(path)
    assert isinstance(raster, WindowedRaster) and raster.shape == (300, 500, 3)
    for rows, cols in [(slice(0, 300), slice(0, 500)), (slice(10, 77), slice(60, 200)),
                       (slice(250, 300), slice(450, 500)), (slice(64, 128), slice(0, 64))]:
        np.testing.assert_array_equal(raster[rows, cols], image[rows, cols])
    np.testing.assert_array_equal(np.asarray(raster), load_image(path))


def test_deep_multiband_rasters_are_scaled_as_when_decoded_whole(tmp_path):
    """16-bit, four bands stored plane by plane, GDAL nodata: bands picked, nodata black,
    the stretch range found from the raster's tiles."""
    bands = np.random.default_rng(1).integers(1, 4096, (4, 200, 260), dtype=np.uint16)
    bands[:, :10, :10] = 0
    path = tmp_path / "multispectral.tif"
    tifffile.imwrite(path, bands, tile=(64, 64), planarconfig="separate", photometric="minisblack",
                     extratags=[(42113, "s", 0, "0", True)])
    for scaling in (PixelScaling(value_range=(0, 4095), bands=(4, 1, 2)),
                    PixelScaling(bands=(4, 1, 2))):
        windowed = open_raster(path, scaling)
        np.testing.assert_array_equal(windowed[:, :], load_image(path, scaling=scaling))
        assert (windowed[0:10, 0:10] == 0).all()
    with pytest.raises(ImageError, match="band 5 asked for, but the image has 4"):
        open_raster(path, PixelScaling(bands=(5, 1, 2)))


def test_only_local_tiled_tiffs_are_windowed(tmp_path):
    image = np.zeros((64, 64, 3), np.uint8)
    tifffile.imwrite(tmp_path / "strips.tif", image, photometric="rgb")
    Image.fromarray(image).save(tmp_path / "photo.png")
    assert open_raster(tmp_path / "strips.tif") is None
    assert open_raster(tmp_path / "photo.png") is None
    assert isinstance(open_image(tmp_path / "photo.png"), np.ndarray)


def test_reading_every_window_of_a_mosaic_holds_a_fraction_of_it(tmp_path):
    path = tmp_path / "mosaic.tif"
    write_mosaic(path, 4000)  # 48 MB decoded
    raster = open_raster(path)
    tracemalloc.start()
    for y in range(0, 4000, 640):
        for x in range(0, 4000, 640):
            assert raster[y : y + 800, x : x + 800].shape[2] == 3
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # two rows of decoded TIFF tiles (8 x 512 px across) are cached, and a few windows
    held = 2 * 8 * 512 * 512 * 3 + 4 * 800 * 800 * 3
    assert peak < held < 48_000_000 / 2, f"{peak / 1e6:.1f} MB held while reading windows"


def test_a_tiled_geotiff_gives_the_detections_of_its_decoded_pixels(tmp_path, fixture_image):
    tiff, png = tmp_path / "ortho.tif", tmp_path / "ortho.png"
    keys = [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633]
    tifffile.imwrite(tiff, fixture_image, tile=(128, 128), compression="zlib",
                     photometric="rgb", extratags=[
                         (34735, "H", len(keys), keys, True),
                         (33550, "d", 3, (0.5, 0.5, 0.0), True),
                         (33922, "d", 6, (0, 0, 0, 500000.0, 4100000.0, 0), True)])
    Image.fromarray(fixture_image).save(png)
    records = {}
    for path in (tiff, png):
        out = tmp_path / f"{path.suffix[1:]}.jsonl"
        geo = tmp_path / f"{path.suffix[1:]}.geojson"
        assert run_predict_cli(FPN, out, path, extra=("--tile-size", "400",
                                                      "--geojson", str(geo))) == 0
        records[path.suffix] = json.loads(out.read_text())["detections"]
    assert records[".tif"] == records[".png"] and records[".tif"]
    features = json.loads((tmp_path / "tif.geojson").read_text())["features"]
    assert len(features) == len(records[".tif"])


def test_a_raster_beyond_the_pixel_limit_runs_tiled_and_is_refused_whole(tmp_path, capsys):
    path = tmp_path / "big.tif"
    write_mosaic(path, 1024)
    out = tmp_path / "out.jsonl"
    assert run_predict_cli(FPN, out, path, extra=("--max-pixels", "500000",
                                                  "--tile-size", "512")) == 0
    assert "detections" in json.loads(out.read_text())
    assert run_predict_cli(FPN, out, path, extra=("--max-pixels", "500000")) == 1
    error = json.loads(out.read_text())["error"]
    assert "1024x1024 window exceeds the pixel limit of 500,000" in error
    assert "run this raster tiled" in error


def test_prelabel_reads_a_folder_of_tiled_tiffs_by_windows(tmp_path, survey, capsys):
    path = tmp_path / "rasters" / "ortho.tif"
    path.parent.mkdir()
    write_mosaic(path, 700)
    out = tmp_path / "out.jsonl"
    cli(["prelabel", "--images", str(path.parent), "--model", str(survey["model"]),
         "--output", str(out), "--device", "cpu", "--tile-size", "320"])
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (record["width"], record["height"]) == (700, 700) and "error" not in record
    assert "tiles=9" in capsys.readouterr().err  # one image, its progress counted in tiles


def test_raster_bench_prints_peak_memory_beside_the_whole_decode_baseline():
    baseline, record = run_raster_benchmark(RasterBench(size=1500, compare_size=1000,
                                                        device="cpu", workers=1))
    assert baseline["windowed"]["tiles"] == baseline["decoded_whole"]["tiles"] > 0
    assert baseline["rss_ratio_windowed_vs_whole"] == pytest.approx(
        baseline["windowed"]["peak_rss_mb"] / baseline["decoded_whole"]["peak_rss_mb"], abs=1e-3)
    assert record["raster"] == "1500x1500" and record["tiles"] > 0 and record["failed"] == 0
    assert record["peak_rss_mb"] > 0 and record["tiles_per_s"] > 0
