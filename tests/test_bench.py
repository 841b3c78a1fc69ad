"""Benchmarks measure a trained model's workload and print the JSON they promise. (Their
figures are read, never asserted: speed is not a test.)"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from backend.bench.engine import EngineBench, build_case, run_engine_benchmark
from backend.bench.export import ExportBench, run_export_benchmark
from backend.bench.prelabel import PrelabelBench, run_prelabel_benchmark
from backend.bench.profile import ProfileRun, profile_case
from backend.bench.training import TrainingBench, run_training_benchmark
from backend.bench.training_memory import TrainingMemoryBench, run_training_memory_benchmark
from backend.bench.workload import WorkloadCounter
from backend.detection.predictor import Predictor
from backend.synthetic import survey_scene

from .conftest import REPO


@pytest.mark.parametrize("case", ["tridentnet_fast_R_50_C4", "faster_rcnn_R_50_FPN"])
def test_conditioned_random_weights_carry_a_trained_models_workload(case):
    """Unconditioned random weights keep a few dozen proposals; conditioned ones keep
    POST_NMS_TOPK_TEST and return DETECTIONS_PER_IMAGE, as a trained model on a busy tile."""
    model = build_case(case, "narrow")
    counter = WorkloadCounter()
    stop = counter.watch_ours(model)
    tile = survey_scene(np.random.default_rng(7), 800, 800, 30).image
    found = Predictor(model, device="cpu")(tile)
    stop()
    counter.add_outputs(1, len(found))
    assert counter.per_image() == {
        "proposals_per_image": float(model.cfg.rpn.post_nms_topk[1]),
        "detections_per_image": float(model.cfg.roi_heads.detections_per_image),
    }


def test_engine_bench_reports_ours_and_torchvision_side_by_side():
    (record,) = run_engine_benchmark(
        EngineBench(cases=("faster_rcnn_R_50_FPN",), batch_sizes=(1,), repeats=1,
                    width="narrow", device="cpu")
    )
    assert record["proposals_per_image"] == record["torchvision_proposals_per_image"] == 1000
    assert record["detections_per_image"] == record["torchvision_detections_per_image"] == 100
    assert record["ratio_vs_torchvision"] == pytest.approx(
        record["ms_per_tile"] / record["torchvision_frcnn_r50_fpn_ms_per_tile"], rel=0.01
    )


def test_prelabel_bench_compares_the_whole_job_with_the_engine():
    """Once per place the job decodes its JPEGs, as gpu-check runs it on a GPU."""
    records = list(run_prelabel_benchmark(
        PrelabelBench(config="tiny_tridentnet", images=2, height=480, width=640,
                      tile_size=320, overlap=0.2, device="cpu", workers=2,
                      decodes=("cpu", "device"))
    ))
    assert [(r["runner"], r.get("decode")) for r in records] == [
        ("engine", None), ("single", "cpu"), ("single", "device")]
    for job in records[1:]:
        assert job["failed"] == 0 and job["tiles_per_image"] == 6
        assert job["ratio_vs_engine"] == pytest.approx(
            job["tiles_per_s"] / records[0]["tiles_per_s"], rel=0.01
        )


def test_training_bench_reports_images_per_second_and_the_loss():
    (record,) = run_training_benchmark(
        TrainingBench(config="tiny_tridentnet", batch_size=2, iterations=2, warmup=1,
                      crop_size=320, device="cpu", baseline=False)
    )
    assert record["images_per_s"] > 0
    assert len(record["losses"]) == 3 and record["loss_finite"]


def test_profile_attributes_the_time_to_the_models_stages_and_operators():
    """What aims a GPU change: the C4 head's res5 is where a CPU tile's time goes."""
    head, *rows = profile_case(ProfileRun(width="narrow", batch=1, runs=1, precision="fp32",
                                          device="cpu", top=5, sort="cpu"))
    stages = {r["stage"]: r["cpu_ms_per_tile"] for r in rows if "stage" in r}
    operators = [r for r in rows if "op" in r]
    assert head["ms_per_tile"] > 0 and len(operators) == 5
    assert {"backbone", "proposal_generator", "roi_heads.pooler", "roi_heads.res5"} <= set(stages)
    assert stages["roi_heads.res5"] > stages["backbone"]
    assert operators[0]["self_cpu_ms_per_tile"] >= operators[-1]["self_cpu_ms_per_tile"]


def test_bench_cli_lists_cases_and_refuses_unknown_ones():
    listed = subprocess.run([sys.executable, "-m", "backend.cli", "bench", "--list"],
                            capture_output=True, text=True, check=True, cwd=REPO)
    assert "tridentnet_fast_R_50_C4" in listed.stdout.split()
    bad = subprocess.run([sys.executable, "-m", "backend.cli", "bench", "--models", "yolo",
                          "--device", "cpu"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "unknown benchmark case(s) ['yolo']" in bad.stderr


def test_gpu_check_fails_loudly_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run for real")
    report = tmp_path / "gpu.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "backend.bench.gpu_check", "--report", str(report)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2
    assert "CUDA is not available" in proc.stderr
    (line,) = report.read_text().splitlines()
    record = json.loads(line)
    assert (record["check"], record["ok"]) == ("cuda", False)
    assert "CUDA is not available" in record["error"]


# What the GPU machine's image lacks (../.library/device/KINDS.md, 2026-11-17): gpu-check
# runs there with no package index, carrying only the wheels `make gpu-wheels` fetches.
NOT_ON_THE_GPU_IMAGE = ("fastapi", "uvicorn", "starlette", "pydantic", "pycocotools",
                        "label_studio_sdk", "dvc", "ray", "rasterio", "geopandas")


def test_gpu_check_and_its_cuda_tests_load_without_what_the_gpu_image_lacks():
    """A missing package must fail only the section that needs it, never the whole check."""
    blocker = (
        "import sys, importlib.abc\n"
        "class Missing(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name.split('.')[0] in {NOT_ON_THE_GPU_IMAGE!r}:\n"
        "            raise ImportError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Missing())\n"
    )
    check = subprocess.run(
        [sys.executable, "-c", blocker + "import backend.bench.gpu_check, backend.cli.main"
         "\nimport pytest\nsys.exit(pytest.main(['--collect-only', '-q', '-m', 'cuda', "
         "'-p', 'no:cacheprovider', 'tests/test_cuda.py']))"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    assert "test_jpegs_decoded_by_nvjpeg" in check.stdout


@pytest.mark.slow
def test_export_bench_fetches_only_the_new_images_the_second_time(label_studio):
    (record,) = run_export_benchmark(ExportBench(tasks=30, added_percent=10), label_studio)
    assert (record["added"], record["second_fetched"], record["images"]) == (3, 3, 33)
    assert record["second_tasks_read"] == 3  # only the new tasks' annotations are read
    assert record["second_listing"] == "changed tasks"
    assert 0 < record["second_bytes"] < record["first_bytes"] / 5
    assert record["bytes_ratio"] == pytest.approx(
        record["second_bytes"] / record["first_bytes"], abs=1e-4)


def test_training_memory_bench_measures_the_train_stage_with_its_workers():
    (record,) = run_training_memory_benchmark(TrainingMemoryBench(
        images=5, height=400, width=600, iterations=2, tile_size=320, device="cpu"))
    assert record["images"] == 5 and record["workers"] == 2
    assert record["peak_pss_mb"] > 100 and record["within_target"] == (
        record["peak_pss_mb"] < 4096)
