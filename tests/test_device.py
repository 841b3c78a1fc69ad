"""Every option a GPU takes runs on the CPU too, through the same code: reduced precision,
channels-last, pinned non-blocking copies, batches > 1 and padded batches. CI has no GPU, so
these tests are the only thing between a CUDA-only bug and every user's GPU."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.detection.device import DeviceOptions
from backend.detection.predictor import Predictor
from backend.detection.roi_heads import ROIPooler
from backend.serving.inference_queue import InferenceQueue

from .conftest import (
    D2_FIXTURES,
    FIXTURE_MODELS,
    REPO,
    as_detections,
    expected_detections,
    fixture_dir,
    fixture_weights,
    held_batches,
    run_predict_cli,
    twin_fraction,
)

FAST = "tridentnet_fast_R_50_C4_1x"


def _predictor(name: str = FAST, **options) -> Predictor:
    return Predictor.from_files(
        fixture_dir(name) / "config.yaml", fixture_weights(name), device="cpu", **options
    )


def test_channels_last_runs_on_a_3d_image_and_changes_nothing(fixture_image):
    """The bug that failed every CUDA inference: channels-last on (C, H, W) tensors."""
    plain, nhwc = _predictor("faster_rcnn_R_50_FPN_1x"), _predictor(
        "faster_rcnn_R_50_FPN_1x", channels_last=True
    )
    assert len(nhwc.predict([np.zeros((320, 320, 3), np.uint8)])) == 1
    a, b = plain(fixture_image), nhwc(fixture_image)
    assert torch.equal(a.classes, b.classes)
    assert torch.allclose(a.boxes, b.boxes, atol=1e-2)
    assert torch.allclose(a.scores, b.scores, atol=1e-4)


# bf16 keeps 8 bits of mantissa. On TridentNet-Fast, the model this project serves, every
# detection above 0.5 keeps its twin. The other fixtures' random heads give hundreds of
# boxes within 1% of each other's score, so rounding reorders NMS among near-duplicates
# (their twin is then a neighbour at IoU ~0.7): measured 86% (R50-FPN), 92% (R50-C4),
# 89% (3-branch); the bound leaves room for other CPUs' bf16 kernels.
BF16_TWINS = {FAST: 1.0}
BF16_TWINS_OTHERS = 0.8


@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_bf16_channels_last_cli_agrees_with_detectron2_fp32(name, tmp_path):
    out = tmp_path / "bf16.jsonl"
    rc = run_predict_cli(
        name,
        out,
        D2_FIXTURES / "input.png",
        extra=("--no-tiling", "--precision", "bf16", "--channels-last"),
    )
    assert rc == 0
    got = as_detections(json.loads(out.read_text())["detections"])
    reference = as_detections(expected_detections(name)["detections"])
    assert got.boxes.dtype == torch.float32
    assert twin_fraction(reference, got) >= BF16_TWINS.get(name, BF16_TWINS_OTHERS)


def test_fp16_on_cpu_agrees_with_fp32(fixture_image):
    reference = as_detections(expected_detections(FAST)["detections"])
    got = _predictor(precision="fp16", channels_last=True)(fixture_image)
    assert twin_fraction(reference, got) == 1.0
    top = torch.argsort(reference.scores, descending=True)[:10]
    assert torch.allclose(got.scores[:10], reference.scores[top], atol=0.01)


def test_gpu_defaults_all_at_once_on_cpu_equal_one_image_at_a_time(monkeypatch, fixture_image):
    """Pinned uint8 copies, channels-last and batches of 4 (the CUDA defaults) on the CPU.
    Page-locking itself needs the CUDA driver, so it is stood in for by an identity that
    records its calls; everything around it (staging, non-blocking copy, conversion on the
    device) runs for real."""
    pinned: list[torch.Tensor] = []

    def fake_pin(tensor: torch.Tensor) -> torch.Tensor:
        pinned.append(tensor)
        return tensor

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    name = "faster_rcnn_R_50_FPN_1x"
    gpu_like = _predictor(name, pin_memory=True, channels_last=True, batch_size=4)
    assert gpu_like.options == DeviceOptions(
        torch.device("cpu"), "fp32", True, True, 4, cudnn_benchmark=False, roi_align="threads"
    )
    tiles = [np.ascontiguousarray(fixture_image[y : y + 400, x : x + 400])
             for y in (0, 400) for x in (0, 400)]
    batched = gpu_like.predict(tiles)
    assert len(pinned) == 4 and all(t.dtype == torch.uint8 for t in pinned)
    plain = _predictor(name)
    for tile, det in zip(tiles, batched, strict=True):
        # Another batch size is another summation order: scores move by ~1e-6, and two
        # detections whose scores tie that closely may trade places; each keeps its twin.
        alone = plain(tile)
        assert len(alone) == len(det)
        assert twin_fraction(alone, det, min_score=0.0) == 1.0
        assert torch.allclose(alone.scores, det.scores, atol=1e-4)


def test_images_of_different_sizes_share_a_zero_padded_batch(fixture_image):
    """detectron2's batching: pad to the largest image. The image that sets the padded size
    gets exactly its own detections; a smaller one sees zeros beyond its right edge, which
    moves some near-tied boxes in NMS, so most (not all) keep their twin."""
    predictor = _predictor()
    wide = np.ascontiguousarray(np.concatenate([fixture_image, fixture_image[:, :200]], axis=1))
    together = predictor.predict([wide, fixture_image])
    assert [d.image_size for d in together] == [(800, 1000), (800, 800)]
    alone_wide = predictor(wide)
    assert torch.equal(together[0].boxes, alone_wide.boxes)
    assert torch.equal(together[0].scores, alone_wide.scores)
    assert twin_fraction(predictor(fixture_image), together[1], min_score=0.0) >= 0.8


def test_server_queue_batches_requests_of_one_input_shape(fixture_image):
    """Photos of slightly different sizes that resize to the same network input share a
    forward pass across requests; each request still gets its own image's detections."""
    predictor = _predictor("faster_rcnn_R_50_FPN_1x", batch_size=4)
    photos = [np.ascontiguousarray(fixture_image[:600, :800]),  # both resize to 800 x 1067
              np.ascontiguousarray(fixture_image[:450, :600])]
    photos += [np.ascontiguousarray(p[:, ::-1]) for p in photos]
    queue = InferenceQueue(max_batch=4)
    with held_batches(predictor) as (gate, batches):
        futures = [queue.submit(predictor, photo, None) for photo in photos]
        gate.set()  # the first batch waited while the other requests arrived
        results = [f.result(timeout=120) for f in futures]
    queue.close()
    assert max(batches) > 1
    plain = _predictor("faster_rcnn_R_50_FPN_1x")
    for photo, det in zip(photos, results, strict=True):
        assert det.image_size == photo.shape[:2]
        assert twin_fraction(plain(photo), det, min_score=0.0) >= 0.95


def test_roi_coordinates_keep_fp32_precision_under_bf16():
    """In bf16, a coordinate of 600.5 px rounds to 600 (4 px steps between 512 and 1023).
    Pooling from bf16 features must still sample where the fp32 box says."""
    pooler = ROIPooler(7, [1.0 / 16], 0, True)
    x = torch.arange(64, dtype=torch.float32)
    feature = torch.sin(x * 1.3)[None, None, None, :].expand(1, 8, 64, 64).contiguous()
    boxes = torch.tensor([[600.5, 100.0, 641.5, 180.0], [702.5, 40.0, 750.5, 90.0]])
    images = torch.zeros(2, dtype=torch.int64)
    exact = pooler([feature], boxes, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = pooler([feature.bfloat16()], boxes, images)
    rounded = pooler([feature], boxes.bfloat16().float(), images)
    quantisation = (pooled.float() - exact).abs().max()
    assert quantisation < 0.02  # bf16 rounding of the feature values only
    assert (rounded - exact).abs().max() > 5 * quantisation  # what rounding boxes would do


CUDA_SITES_ALLOWED = {
    "backend/detection/device.py": "CUDA picks defaults the CPU can take (tests above)",
    "backend/bench/gpu_check.py": "the GPU check asks for CUDA by name; without it, it "
    "fails loudly (tests/test_bench.py runs that path)",
}


def _cuda_sites(path: Path) -> list[int]:
    """Lines that ask about CUDA: `torch.cuda.*`, `torch.backends.cudnn`, `.is_cuda`, or a
    "cuda" string literal (a device-type comparison)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Attribute) and (
            node.attr in ("cuda", "cudnn", "is_cuda")
            and not (isinstance(node.value, ast.Name) and node.value.id == "self")
        )) or (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and (node.value == "cuda" or node.value.startswith("cuda:"))
        ):
            lines.append(node.lineno)
    return lines


def test_no_cuda_only_branch_outside_the_device_module():
    """How this suite knows that no CUDA-only path hides from it: only device.py may ask
    whether a device is CUDA, and there CUDA only picks defaults that DeviceOptions lets the
    CPU take (the tests above take each of them) or calls that have no CPU meaning
    (synchronize, device name, the NCCL backend). A new `if cuda:` anywhere else fails
    here until it moves behind an option a CPU test runs."""
    offenders = {}
    for root in ("backend", "pipelines"):
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel not in CUDA_SITES_ALLOWED and (lines := _cuda_sites(path)):
                offenders[rel] = lines
    assert offenders == {}


def test_cuda_defaults_are_options_the_cpu_takes():
    cpu_defaults = DeviceOptions.create("cpu")
    assert (cpu_defaults.channels_last, cpu_defaults.pin_memory, cpu_defaults.batch_size) == (
        True,
        False,
        1,
    )
    assert (cpu_defaults.fold_norms, cpu_defaults.nms, cpu_defaults.roi_align) == (
        True, "exact", "threads")
    assert not DeviceOptions.create("cpu", "bf16").fold_norms
    everything = DeviceOptions.create(
        "cpu", "bf16", channels_last=True, pin_memory=True, batch_size=8
    )
    assert everything.memory_format == torch.channels_last
    assert everything.autocast_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        DeviceOptions.create("cpu", "fp8")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        DeviceOptions.create("cuda")


def test_the_queue_skips_work_whose_request_gave_up(fixture_image):
    """A request past its deadline cancels its queued image: the device never runs it, and
    the worker survives to serve the next request."""
    predictor = _predictor("faster_rcnn_R_50_FPN_1x")
    queue = InferenceQueue(max_batch=1)
    photo = np.ascontiguousarray(fixture_image[:320, :320])
    with held_batches(predictor) as (gate, ran):
        first = queue.submit(predictor, photo, None)  # holds the worker at the gate
        abandoned = queue.submit(predictor, photo, None)
        assert abandoned.cancel()
        gate.set()
        first.result(timeout=60)
        after = queue.submit(predictor, photo, None).result(timeout=60)
    queue.close()
    assert len(after) > 0 and ran == [1, 1]  # the abandoned image never ran


def test_the_exact_mode_on_cuda_turns_tf32_off():
    """The CUDA-only branch of the exact mode, taken on the CPU: flags only, no GPU work."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        DeviceOptions(torch.device("cuda"), fold_norms=False, exact=True).apply_backend_flags()
        assert not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_compiled_modes_find_what_eager_finds_and_graph_only_the_backbone(monkeypatch,
                                                                          tmp_path):
    """`--cuda-graphs` (torch.compile's reduce-overhead mode) compiles the fixed-shape backbone
    in that mode and the box head, whose shapes vary, in the default one; on the CPU the same
    compiled code runs without graphs. An unknown mode is refused, naming the modes."""
    from backend.bench.workload import conditioned_model_dir

    modes: list[str | None] = []
    compile_ = torch.compile

    def recording(model, **options):
        modes.append(options.get("mode"))
        return compile_(model, **options)

    monkeypatch.setattr(torch, "compile", recording)
    model = conditioned_model_dir(tmp_path / "tiny", "tiny_tridentnet")
    rng = np.random.default_rng(2)
    tiles = [np.ascontiguousarray(rng.integers(0, 255, (320, 320, 3), np.uint8))
             for _ in range(2)]
    eager = model.predictor(device="cpu", batch_size=2).predict(tiles)
    compiled = model.predictor(device="cpu", batch_size=2, compile="reduce-overhead")
    assert modes == ["reduce-overhead", "default"]
    for got, expected in zip(compiled.predict(tiles), eager, strict=True):
        assert len(expected) and twin_fraction(expected, got, min_score=0.0) >= 0.95
    with pytest.raises(ValueError, match=r"compile mode 'max-speed' is not one of"):
        DeviceOptions.create("cpu", compile="max-speed")
    from backend.cli.main import build_parser

    for flags, mode in (([], None), (["--compile"], "default"),
                        (["--cuda-graphs"], "reduce-overhead")):
        args = build_parser().parse_args(["predict", *flags, "frame.jpg", "--model", "m"])
        assert args.compile == mode and args.images == ["frame.jpg"]
