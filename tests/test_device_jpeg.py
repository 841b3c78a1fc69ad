"""`--decode device`: JPEGs decoded where the model runs give the pixels the CPU path gives
(upright per EXIF, the same limits and errors), and the batch job's detections do not change.
On a CPU device the path runs torchvision's CPU decoder; on CUDA, nvJPEG (gpu-check)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from backend.cli import main
from backend.detection.predictor import Predictor
from backend.imagery.device_jpeg import decode_on_device
from backend.imagery.images import ImageError, PixelScaling, load_image
from backend.prelabel.sources import FileLoader, Item, image_files
from backend.prelabel.stream import detect_stream
from backend.synthetic import survey_scene

from .test_prelabel import TILING

CPU = torch.device("cpu")


def _jpeg(pixels: np.ndarray, orientation: int = 1) -> bytes:
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_upright_as_pil_shows_it(orientation):
    quadrants = np.zeros((60, 90, 3), np.uint8)  # four colours: any flip or turn shows
    quadrants[:30, 45:] = (0, 240, 0)
    quadrants[30:, :45] = (0, 0, 240)
    quadrants[30:, 45:] = (240, 240, 0)
    quadrants[:30, :45] = (240, 0, 0)
    data = _jpeg(quadrants, orientation)
    decoded = decode_on_device(data, CPU, 10**8, "camera.jpg")
    assert isinstance(decoded, torch.Tensor) and decoded.dtype == torch.uint8
    np.testing.assert_array_equal(decoded.numpy(), load_image(data))


def test_a_jpeg_with_a_range_or_bands_to_apply_is_decoded_where_they_are_applied(tmp_path):
    """`--value-range` and `--bands` rescale 8-bit JPEGs too (the CPU path): such a JPEG is
    not handed to the device decoder, which would give its pixels as they are."""
    path = tmp_path / "frame.jpg"
    path.write_bytes(_jpeg(survey_scene(np.random.default_rng(1), 80, 120, 2).image))
    for scaling in (PixelScaling(value_range=(20, 200)), PixelScaling(bands=(2,))):
        got = FileLoader(scaling=scaling, jpeg_device=CPU)(Item(str(path)))
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, load_image(path, scaling=scaling))


def test_limits_and_broken_files_fail_as_the_cpu_path_does():
    data = _jpeg(np.full((40, 50, 3), 90, np.uint8))
    with pytest.raises(ImageError, match="exceeds the pixel limit"):
        decode_on_device(data, CPU, 1_000, "big.jpg")
    with pytest.raises(ImageError, match=r"truncated\.jpg: cannot be decoded"):
        decode_on_device(data[: len(data) // 2], CPU, 10**8, "truncated.jpg")


def test_the_batch_job_decoding_on_the_device_finds_what_it_finds_on_the_cpu(
        fpn_predictor, tmp_path):
    """JPEGs (one of them tiled, one resized as the model's input wants) come from the
    loader as tensors; PNGs and broken files as before; the detections are the same."""
    rng = np.random.default_rng(8)
    for i, (h, w) in enumerate([(400, 600), (200, 300)]):
        (tmp_path / f"frame{i}.jpg").write_bytes(_jpeg(survey_scene(rng, h, w, 6).image))
    Image.fromarray(survey_scene(rng, 240, 320, 4).image).save(tmp_path / "frame2.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    items = [Item(f) for f in image_files(str(tmp_path))]
    on_device = FileLoader(jpeg_device=CPU)
    assert isinstance(on_device(Item(str(tmp_path / "frame0.jpg"))), torch.Tensor)
    assert isinstance(on_device(Item(str(tmp_path / "frame2.png"))), np.ndarray)
    predictor = Predictor(fpn_predictor.model, "cpu", batch_size=4)
    runs = [{r.item.uri: r for r in detect_stream(items, loader, [predictor], TILING, workers=2)}
            for loader in (FileLoader(), on_device)]
    cpu, device = runs
    assert "broken.jpg: cannot be decoded" in device[str(tmp_path / "broken.jpg")].error
    for uri, expected in cpu.items():
        if expected.error is None:
            assert torch.equal(device[uri].detections[0].boxes, expected.detections[0].boxes)
            assert torch.equal(device[uri].detections[0].scores, expected.detections[0].scores)
            assert device[uri].detections[0].boxes.numel() > 0


def test_settings_device_decoding_cannot_honour_are_refused_naming_them(survey, tmp_path, capsys):
    run = ["prelabel", "--images", str(survey["root"]), "--model", str(survey["model"]),
           "--device", "cpu", "--output", str(tmp_path / "o.jsonl"), "--decode", "device"]
    assert main([*run, "--exact"]) == 2
    assert "--decode device uses nvJPEG" in capsys.readouterr().err
    assert main([*run, "--ray", "local"]) == 2
    assert "with --ray, decode tasks run on the cluster's CPUs" in capsys.readouterr().err
