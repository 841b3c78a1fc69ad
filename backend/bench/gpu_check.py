"""`make gpu-check`: what only a GPU can show, in one run and one JSON Lines report.

Runs on a CUDA machine with torch already installed and no network, from the source tree
(`PYTHONPATH=.`), most important first so that a run cut short keeps it. The sections run
on an H200 on 2026-12-04 took about 5 minutes; the serve section, the `graphs` variant, the
nvJPEG run and section 8 were added since and are not yet timed on a GPU (`--skip
active-learning serve` leaves the largest out):
1. the CUDA tests (`pytest -m cuda`: fidelity, reduced precision, exact batched NMS against
   torchvision's CUDA kernel, ROI chunks, tiling, the prelabel stream, the server's queue,
   AMP training), one report line per test;
2. the engine at bf16, batch 16, every case, with its variants side by side (default,
   torchvision's NMS or ROIAlign, folded norms) beside torchvision's Faster R-CNN R50-FPN,
   and what the TridentNet-Fast rate means for a 100,000-image survey;
3. with `--before DIR` (a copy of an earlier tree), that engine on the same card, same
   settings, in its own process: the before/after of a change;
4. the survey batch job on generated 6000x4000 frames (54 tiles each) vs the bare engine,
   its JPEGs decoded by the CPU workers and by nvJPEG (`--decode device`) side by side;
5. torch.compile (opt-in) against the default, for TridentNet-Fast and R50-FPN, also with
   the backbone replayed as a CUDA Graph (`--cuda-graphs`);
6. training: full-size TridentNet R50-C4 with AMP beside torchvision's training step;
7. the live backend with full-size TridentNet-Fast at bf16: its overhead over the engine,
   smart-tool latency (p95) idle and beside a batch load, fairness with hanging URLs;
8. the selection benchmark (`bench --active-learning`) with the loop's own training, 150
   steps per round, which the CPU cannot run in its hour;
9. with `--matrix`, every case at bf16 / fp16 / fp32 and batches 1, 4, 8, 16.
Without CUDA it fails at once, loudly: a check that skips would pass where nothing ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

import torch
import torchvision

from ..detection.device import device_name, resolve_device
from .engine import CASES, EngineBench, SurveySettings, run_engine_benchmark
from .prelabel import PrelabelBench, run_prelabel_benchmark
from .training import TrainingBench, run_training_benchmark

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("tests", "engine", "before", "prelabel", "compiled", "training", "serve",
            "active-learning", "matrix")


class Report:
    """One JSON object per line, flushed at once: a run cut short keeps what it measured."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.failures = 0

    def write(self, check: str, record: dict) -> None:
        failed = record.get("ok") is False or "error" in record or record.get("outcome") in (
            "failed",
            "error",
        )
        self.failures += failed
        line = json.dumps({"check": check, **record})
        self.stream.write(line + "\n")
        self.stream.flush()
        print(line, flush=True)

    def extend(self, check: str, records: Iterable[dict]) -> list[dict]:
        kept = []
        for record in records:
            self.write(check, record)
            kept.append(record)
        return kept


def run_cuda_tests(report: Report, fixtures: Path | None) -> None:
    carried = os.environ.get("PYTHONPATH")  # the wheels `make gpu-check` installed, if any
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), carried])))
    if fixtures is not None:
        env["TRIDENTLOOP_D2_FIXTURES"] = str(fixtures.resolve())
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "cuda.xml"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
             f"--junitxml={junit}", "tests/test_cuda.py"],
            cwd=REPO, env=env, capture_output=True, text=True,
        )
        if not junit.is_file():
            report.write("tests", {"ok": False, "error": (proc.stdout + proc.stderr)[-2000:]})
            return
        for case in ET.parse(junit).getroot().iter("testcase"):
            problem = next(iter(case), None)
            outcome = "passed" if problem is None else problem.tag
            record = {"name": case.get("name"), "outcome": outcome,
                      "seconds": float(case.get("time", 0))}
            if problem is not None:
                record["message"] = (problem.get("message") or "")[:500]
            report.write("test", record)


FAST, FPN = "tridentnet_fast_R_50_C4", "faster_rcnn_R_50_FPN"


def _engine(report: Report, repeats: int) -> None:
    records = report.extend("engine", run_engine_benchmark(EngineBench(
        precisions=("bf16",), batch_sizes=(16,), repeats=repeats, device="cuda",
        survey=SurveySettings(),
        variants=("default", "torchvision-nms", "torchvision-roi-align", "folded"),
    )))
    fast = [r for r in records if r["case"] == FAST and "tiles_per_s" in r]
    if fast:
        best = max(fast, key=lambda r: r["tiles_per_s"])
        report.write("survey", {k: best[k] for k in ("case", "precision", "batch", "variant",
                                                     "tiles_per_s", "survey")})


def _before(report: Report, tree: Path, repeats: int) -> None:
    """The engine of an earlier tree, on this card, in its own process (its own code)."""
    proc = subprocess.run(
        [sys.executable, "-m", "backend.cli", "bench", "--device", "cuda", "--precisions",
         "bf16", "--batch-sizes", "16", "--repeats", str(repeats), "--models", *CASES],
        cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree.resolve())),
        capture_output=True, text=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    report.extend("before", (json.loads(line) for line in lines))
    if proc.returncode != 0:
        report.write("before", {"ok": False, "error": proc.stderr[-1000:]})


# The two sections below need packages the GPU image may lack (the server's fastapi and
# uvicorn; pycocotools): imported there, so that a missing one fails its section, named in
# the report, and not the whole check. `make gpu-wheels` fetches them to carry.


def _serve(report: Report) -> None:
    from .serve import ServeBench, run_serve_benchmark

    report.extend("serve", run_serve_benchmark(ServeBench(
        config=FAST, device="cuda", precision="bf16")))


def _active_learning(report: Report) -> None:
    """With the loop's own 150 steps per round (the CPU default is 40: ~2 h on 2 cores)."""
    from .active_learning import ActiveLearningBench, run_active_learning_benchmark

    report.extend("active-learning", run_active_learning_benchmark(ActiveLearningBench(
        device="cuda", iterations=150, jobs=4)))


def _matrix(report: Report, repeats: int) -> None:
    report.extend("matrix", run_engine_benchmark(EngineBench(
        precisions=("bf16", "fp16", "fp32"), batch_sizes=(1, 4, 8, 16), repeats=repeats,
        device="cuda",
    )))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=Path("gpu-check.jsonl"))
    parser.add_argument("--fixtures", type=Path, default=None,
                        help="detectron2 fixtures folder (default: ../shared/fixtures/detectron2)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--before", type=Path, default=None,
                        help="an earlier source tree whose engine to time on the same card")
    parser.add_argument("--matrix", action="store_true",
                        help="also every case at bf16/fp16/fp32 x batch 1/4/8/16")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(SECTIONS))
    args = parser.parse_args(argv)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    with args.report.open("w") as stream:
        report = Report(stream)
        try:
            device = resolve_device("cuda")
        except RuntimeError as exc:
            report.write("cuda", {"ok": False, "error": str(exc)})
            print(f"gpu-check: FAILED: {exc}; nothing was measured", file=sys.stderr)
            return 2
        started = time.monotonic()
        report.write("environment", {
            "device": device_name(device), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
        })
        # What matters most first: a run cut short still reports it.
        sections = {
            "tests": lambda: run_cuda_tests(report, args.fixtures),
            "engine": lambda: _engine(report, args.repeats),
            "before": lambda: _before(report, args.before, args.repeats),
            "prelabel": lambda: report.extend("prelabel", run_prelabel_benchmark(PrelabelBench(
                images=16, device="cuda", precision="bf16", batch_size=16, workers=8,
                decodes=("cpu", "device"),
            ))),
            "compiled": lambda: report.extend("compiled", run_engine_benchmark(EngineBench(
                cases=(FAST, FPN), precisions=("bf16",), batch_sizes=(16,),
                repeats=args.repeats, device="cuda", baseline=False,
                variants=("default", "compiled", "graphs"),
            ))),
            "training": lambda: report.extend(
                "training", run_training_benchmark(TrainingBench(device="cuda"))
            ),
            "serve": lambda: _serve(report),
            "active-learning": lambda: _active_learning(report),
            "matrix": lambda: _matrix(report, args.repeats),
        }
        assert set(sections) == set(SECTIONS)
        for name, section in sections.items():
            if name in args.skip or (name == "before" and args.before is None) or (
                name == "matrix" and not args.matrix
            ):
                continue
            begun = time.monotonic()
            try:
                section()
            except Exception as exc:  # report it and measure the rest
                report.write(name, {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:1000]})
            report.write("section", {"name": name,
                                     "seconds": round(time.monotonic() - begun, 1)})
        report.write("done", {"seconds": round(time.monotonic() - started, 1),
                              "failures": report.failures})
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
