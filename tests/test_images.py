"""Images in: formats, bit depths, channels, orientation, and clear errors naming the file."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from backend.imagery.images import ImageError, PixelScaling, load_image

from .conftest import D2_FIXTURES, run_predict_cli

RGB = np.random.default_rng(0).integers(0, 256, size=(40, 60, 3), dtype=np.uint8)


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_png_and_jpeg_decode_to_rgb_uint8(tmp_path):
    png = load_image(_save(Image.fromarray(RGB), tmp_path / "a.png"))
    assert png.dtype == np.uint8 and png.shape == (40, 60, 3)
    assert np.array_equal(png, RGB)
    jpeg = load_image(_save(Image.fromarray(RGB), tmp_path / "a.jpg", quality=95))
    assert jpeg.shape == (40, 60, 3)


def test_greyscale_and_rgba_become_three_channels(tmp_path):
    grey = load_image(_save(Image.fromarray(RGB[:, :, 0]), tmp_path / "g.png"))
    assert grey.shape == (40, 60, 3) and np.array_equal(grey[:, :, 1], RGB[:, :, 0])
    rgba = np.dstack([RGB, np.full((40, 60), 7, np.uint8)])
    assert np.array_equal(load_image(_save(Image.fromarray(rgba), tmp_path / "a.png")), RGB)


def test_16_bit_images_map_a_fixed_range_exactly(tmp_path):
    grey16 = RGB[:, :, 0].astype(np.uint16) * 257
    full = PixelScaling(value_range=(0, 65535))
    out = load_image(_save(Image.fromarray(grey16), tmp_path / "g16.png"), scaling=full)
    assert np.array_equal(out[:, :, 0], RGB[:, :, 0])
    rgb16 = RGB.astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb")
    assert np.array_equal(load_image(tmp_path / "rgb16.tif", scaling=full), RGB)


def _ramp(high: float, dtype) -> np.ndarray:
    """A 100 x 100 ramp from 0 to `high`: its 0.5th-99.5th percentiles are the stretch."""
    return np.linspace(0, high, 100 * 100).reshape(100, 100).astype(dtype)


@pytest.mark.parametrize("dtype, high", [(np.uint16, 4095), (np.uint16, 65535),
                                         (np.float32, 0.37), (np.float32, 2500.0)])
def test_deep_data_is_stretched_by_its_real_range(tmp_path, dtype, high):
    """12-bit data in a 16-bit file, full 16-bit, reflectance and elevation floats: each
    spans black to white, not a sliver of it (12-bit / 65535 was nearly black)."""
    tifffile.imwrite(tmp_path / "deep.tif", _ramp(high, dtype))
    out = load_image(tmp_path / "deep.tif")[:, :, 0]
    assert out.min() == 0 and out.max() == 255
    assert 120 <= int(np.median(out)) <= 135


def test_multi_band_rasters_take_the_first_three_or_the_bands_asked(tmp_path):
    bands = np.stack([_ramp(4095, np.uint16) * 0 + v for v in (1000, 2000, 3000, 4000)], -1)
    bands[0, 0] = 0  # a dark pixel and a bright one set the stretch
    bands[-1, -1] = 4095
    tifffile.imwrite(tmp_path / "rgbn.tif", bands, photometric="minisblack", planarconfig="contig")
    fixed = PixelScaling(value_range=(0, 4000))
    assert load_image(tmp_path / "rgbn.tif", scaling=fixed)[50, 50].tolist() == [64, 128, 191]
    nir = PixelScaling(value_range=(0, 4000), bands=(4, 1, 2))  # a false-colour composite
    assert load_image(tmp_path / "rgbn.tif", scaling=nir)[50, 50].tolist() == [255, 64, 128]
    with pytest.raises(ImageError, match=r"rgbn\.tif: band 5 asked for, but the image has 4"):
        load_image(tmp_path / "rgbn.tif", scaling=PixelScaling(bands=(5, 1, 2)))
    with pytest.raises(ValueError, match="one band or three"):
        PixelScaling(bands=(1, 2))


def test_nodata_is_masked_from_the_stretch_and_comes_out_black(tmp_path):
    data = _ramp(3000, np.float32)
    data[:20] = -9999.0  # the collar of an orthomosaic
    data[20, :5] = np.nan
    tifffile.imwrite(tmp_path / "dem.tif", data, extratags=[(42113, "s", 0, "-9999", True)])
    out = load_image(tmp_path / "dem.tif")[:, :, 0]
    assert (out[:20] == 0).all() and (out[20, :5] == 0).all()
    valid = out[21:]
    assert valid.max() == 255 and np.median(valid) > 100  # not squashed by -9999


def test_8_bit_tiff_decodes(tmp_path):
    tifffile.imwrite(tmp_path / "rgb8.tif", RGB, photometric="rgb")
    assert np.array_equal(load_image(tmp_path / "rgb8.tif"), RGB)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(Image.fromarray(RGB), tmp_path / "camera.jpg", exif=exif, quality=95)
    assert load_image(path).shape == (60, 40, 3)


def test_bytes_decode_like_files():
    buffer = io.BytesIO()
    Image.fromarray(RGB).save(buffer, format="PNG")
    assert np.array_equal(load_image(buffer.getvalue()), RGB)


def test_missing_file_error_names_it(tmp_path):
    with pytest.raises(ImageError, match=r"absent\.png: file not found"):
        load_image(tmp_path / "absent.png")


def test_non_image_error_names_it(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(ImageError, match=r"notes\.png: not an image"):
        load_image(tmp_path / "notes.png")


def test_truncated_file_error_names_it(tmp_path):
    data = (D2_FIXTURES / "input.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.png: .*truncated"):
        load_image(tmp_path / "cut.png")


def test_pixel_limit_refuses_large_images_before_decoding(tmp_path):
    path = _save(Image.new("RGB", (300, 200)), tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"big\.png: 300x200 exceeds the pixel limit of 50,000"):
        load_image(path, max_pixels=50_000)


def test_images_past_pils_own_bomb_limits_load_up_to_ours(tmp_path):
    """A 190 MP survey frame is over PIL's warning (89.5 MP) and error (179 MP) limits but
    under our default 600 MP: it loads; our limit still refuses it when set lower."""
    path = _save(Image.new("L", (19_000, 10_000), 90), tmp_path / "mosaic.png")
    image = load_image(path)
    assert image.shape == (10_000, 19_000, 3) and int(image[5_000, 9_000, 1]) == 90
    del image
    with pytest.raises(ImageError, match=r"mosaic\.png: 19000x10000 exceeds the pixel limit"):
        load_image(path, max_pixels=100_000_000)


def test_a_bad_file_does_not_stop_the_others(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    out = tmp_path / "out.jsonl"
    rc = run_predict_cli("faster_rcnn_R_50_FPN_1x", out, tmp_path / "broken.jpg",
                         D2_FIXTURES / "input.png")
    assert rc == 1  # something failed, and it says so
    broken, good = (json.loads(line) for line in out.read_text().splitlines())
    assert broken["image"].endswith("broken.jpg") and "error" in broken
    assert len(good["detections"]) == 100


def test_predict_takes_the_pixel_settings_and_refuses_bad_ones(tmp_path, capsys):
    survey = (RGB.astype(np.uint16) * 16)  # 12-bit data
    tifffile.imwrite(tmp_path / "s12.tif", survey, photometric="rgb")
    out = tmp_path / "out.jsonl"
    fixed = ("--value-range", "0", "4095", "--bands", "3,2,1", "--no-tiling")
    assert run_predict_cli("faster_rcnn_R_50_FPN_1x", out, tmp_path / "s12.tif", extra=fixed) == 0
    assert json.loads(out.read_text())["width"] == 60
    assert run_predict_cli("faster_rcnn_R_50_FPN_1x", out, tmp_path / "s12.tif",
                           extra=("--bands", "1,2")) == 2
    assert "give one band or three" in capsys.readouterr().err
