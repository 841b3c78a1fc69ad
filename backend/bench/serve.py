"""`tridentloop bench --serve`: concurrent /predict load on a live backend.

16 concurrent requests of 4 tasks each hit the server over loopback HTTP; the same images run
through the engine alone, one after another, in the same process. The ratio of the two wall
times is the server's overhead (target <= 1.05: fetching, decoding, queueing and JSON must
cost next to nothing beside the model). Peak memory shows the queue stays bounded.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from ..detection.images import load_image
from ..serving.app import Backend, ServerSettings
from ..serving.jobs import TrainingJobs
from ..serving.media import MediaFetcher, MediaSettings
from ..serving.model_source import ModelSource
from ..serving.server import serve_in_thread
from ..synthetic import CLASSES, survey_scene
from .timing import peak_rss_mb
from .workload import conditioned_model_dir

LABEL_CONFIG = (
    "<View><Image name='image' value='$image'/><RectangleLabels name='label' "
    "toName='image'>"
    + "".join(f"<Label value='{c}'/>" for c in CLASSES)
    + "</RectangleLabels></View>"
)


@dataclass(frozen=True)
class ServeBench:
    config: str = "tiny_tridentnet"
    requests: int = 16
    tasks_per_request: int = 4
    device: str = "auto"
    precision: str = "fp32"


def run_serve_benchmark(bench: ServeBench) -> Iterator[dict]:
    requests, per_request = bench.requests, bench.tasks_per_request
    with tempfile.TemporaryDirectory(prefix="tridentloop-serve-bench-") as tmp:
        root = Path(tmp)
        conditioned_model_dir(root / "model", bench.config)
        rng = np.random.default_rng(0)
        paths = []
        for i in range(requests * per_request):
            path = root / f"img{i:03d}.png"
            Image.fromarray(survey_scene(rng, 480, 640, 12).image).save(path)
            paths.append(path)
        backend = Backend(
            ModelSource(model_dir=root / "model", device=bench.device, precision=bench.precision),
            MediaFetcher(MediaSettings(local_roots=[root])),
            TrainingJobs("true", root, root / "jobs"),
            ServerSettings(score_threshold=0.5),
        )
        predictor = backend.models.get().predictor
        predictor.detect(load_image(paths[0]), backend.settings.tiling)  # warm-up
        start = time.perf_counter()
        for path in paths:
            predictor.detect(load_image(path), backend.settings.tiling)
        engine_s = time.perf_counter() - start
        rss_before = peak_rss_mb()
        with serve_in_thread(backend) as url:
            bodies = [
                {
                    "tasks": [
                        {"id": j, "data": {"image": str(p)}}
                        for j, p in enumerate(paths[i * per_request : (i + 1) * per_request])
                    ],
                    "project": "1.0",
                    "label_config": LABEL_CONFIG,
                }
                for i in range(requests)
            ]
            with httpx.Client(base_url=url, timeout=300) as client:
                client.post("/predict", json=bodies[0])  # warm-up
                start = time.perf_counter()
                with ThreadPoolExecutor(requests) as pool:
                    answers = list(pool.map(lambda b: client.post("/predict", json=b), bodies))
                server_s = time.perf_counter() - start
        errors = sum(a.status_code != 200 for a in answers)
        empty = sum(
            not r["result"] for a in answers if a.status_code == 200 for r in a.json()["results"]
        )
        yield {
            "case": f"serve:{bench.config}",
            "device": str(predictor.device),
            "requests": requests,
            "tasks_per_request": per_request,
            "engine_s": round(engine_s, 3),
            "server_s": round(server_s, 3),
            "overhead_ratio": round(server_s / engine_s, 3),
            "errors": errors,
            "empty_results": empty,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "rss_growth_under_load_mb": round(peak_rss_mb() - rss_before, 1),
        }
