"""`tridentloop bench --raster`: an orthomosaic far larger than memory, pre-labelled by the
batch job as users run it (`python -m backend.cli prelabel --images ortho.tif`), with its
peak resident memory and tiles/s.

The mosaic is a generated tiled GeoTIFF (BigTIFF, 512 px deflate tiles, UTM georeference),
40,000 x 40,000 px by default: 4.8 GB decoded, read window by window (target peak RSS under
2 GB on CPU). Beside it, the baseline: the same job on a smaller mosaic both ways, tiled
(read by windows) and striped (decoded whole, as a JPEG or PNG is), with the ratios.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..synthetic import survey_scene
from .timing import run_measured
from .workload import conditioned_model_dir

_CHUNK = 512  # px: TIFF tiles, and the side of the generated scenes the mosaic repeats


@dataclass(frozen=True)
class RasterBench:
    size: int = 40_000  # px, a side of the mosaic
    compare_size: int = 6_000  # px, a side of the tiled-vs-whole baseline mosaic
    config: str = "tiny_tridentnet"
    tile_size: int = 800
    overlap: float = 0.2
    device: str = "auto"
    precision: str = "fp32"
    workers: int = 2


def write_mosaic(path: Path, size: int, tiled: bool = True) -> None:
    """A size x size RGB GeoTIFF of survey scenes (animals on textured ground), written
    tile by tile so the generator itself never holds the mosaic."""
    import tifffile

    rng = np.random.default_rng(0)
    scenes = [survey_scene(rng, _CHUNK, _CHUNK, 6).image for _ in range(8)]
    keys = [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633]  # UTM 33N, area
    geo = [(34735, "H", len(keys), keys, True),
           (33550, "d", 3, (0.05, 0.05, 0.0), True),
           (33922, "d", 6, (0, 0, 0, 500000.0, 4100000.0, 0), True)]
    across = -(-size // _CHUNK)

    def tiles() -> Iterator[np.ndarray]:
        for i in range(across * across):
            yield scenes[(i * 7 + i // across) % len(scenes)]

    if tiled:
        tifffile.imwrite(path, data=tiles(), shape=(size, size, 3), dtype=np.uint8,
                         tile=(_CHUNK, _CHUNK), photometric="rgb", compression="zlib",
                         compressionargs={"level": 1}, bigtiff=True, extratags=geo)
        return
    rows = np.concatenate([np.concatenate(
        [scenes[(i * 7 + r) % len(scenes)] for i in range(r * across, (r + 1) * across)],
        axis=1) for r in range(across)])[:size, :size]
    tifffile.imwrite(path, rows, photometric="rgb", compression="zlib",
                     compressionargs={"level": 1}, extratags=geo)


def _run_job(root: Path, model: Path, raster: Path, bench: RasterBench) -> dict:
    """The batch job in a process of its own, with its peak RSS."""
    out = root / f"{raster.stem}.jsonl"
    command = [
        sys.executable, "-m", "backend.cli", "prelabel", "--images", str(raster),
        "--model", str(model), "--output", str(out), "--device", bench.device,
        "--precision", bench.precision, "--tile-size", str(bench.tile_size),
        "--tile-overlap", str(bench.overlap), "--workers", str(bench.workers),
        "--threads", str(torch.get_num_threads()),
    ]
    measured = run_measured(command, f"prelabel on {raster}")
    report = json.loads(out.with_name(out.stem + ".report.json").read_text())
    return {"tiles": report["tiles"], "seconds": report["seconds"],
            "tiles_per_s": round(report["tiles"] / report["seconds"], 2),
            "peak_rss_mb": round(measured.peak_rss_mb), "failed": len(report["failed"])}


def run_raster_benchmark(bench: RasterBench) -> Iterator[dict]:
    with tempfile.TemporaryDirectory(prefix="tridentloop-raster-") as tmp:
        root = Path(tmp)
        model = conditioned_model_dir(root / "model", bench.config).path
        common = {"config": bench.config, "tile_size": bench.tile_size, "device": bench.device}
        small = {}
        for tiled in (True, False):
            path = root / f"compare-{'tiled' if tiled else 'striped'}.tif"
            write_mosaic(path, bench.compare_size, tiled)
            small[tiled] = _run_job(root, model, path, bench)
        yield {"case": "raster-baseline", "raster": f"{bench.compare_size}x{bench.compare_size}",
               **common, "windowed": small[True], "decoded_whole": small[False],
               "rss_ratio_windowed_vs_whole": round(
                   small[True]["peak_rss_mb"] / small[False]["peak_rss_mb"], 3),
               "tiles_per_s_ratio_windowed_vs_whole": round(
                   small[True]["tiles_per_s"] / small[False]["tiles_per_s"], 3)}
        path = root / "ortho.tif"
        started = time.perf_counter()
        write_mosaic(path, bench.size)
        written = time.perf_counter() - started
        result = _run_job(root, model, path, bench)
        yield {"case": "raster", "raster": f"{bench.size}x{bench.size}", **common,
               "decoded_gb": round(bench.size ** 2 * 3 / 1e9, 2),
               "file_gb": round(path.stat().st_size / 1e9, 2), "write_s": round(written, 1),
               **result, "target_peak_rss_mb": 2048,
               "within_target": result["peak_rss_mb"] < 2048}
