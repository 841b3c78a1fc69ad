"""`tridentloop bench --serve`: a live backend under concurrent /predict load.

1. Overhead: `requests` concurrent requests of `tasks_per_request` tasks over loopback HTTP
   against the same images through the engine alone, one after another, in the same
   process. The ratio of the two wall times is the server's overhead (fetching, decoding,
   queueing, JSON).
2. Fairness: at each concurrency level (16 and 64 requests at once), one request in ten
   carries a URL that never answers. Reported: latency p50/p95 of the other requests,
   errors, healthy tasks that came back empty (target 0), and /health latency p99 measured
   throughout (target < 1 s: Label Studio gives up on /health after 1 s). The score
   threshold is 0, so every healthy task has boxes and an empty one is a failure.
3. Smart tools: an annotator's smart rectangles and clicks on one task, one after another,
   while `requests` batch requests run at once: their latency (p50/p95, the first, which
   decodes the image and runs its normal pass, apart), beside the same smart requests on an
   idle server. The priority lane is what keeps them from waiting behind the batch work.
"""

from __future__ import annotations

import http.server
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from ..imagery.images import load_image
from ..media.fetch import MediaFetcher, MediaSettings
from ..serving.backend import Backend, ServerSettings
from ..serving.jobs import TrainingJobs
from ..serving.model_source import ModelSource
from ..serving.server import serve_in_thread
from ..synthetic import LABEL_CONFIG, survey_scene
from .timing import peak_rss_mb
from .workload import conditioned_model_dir


@dataclass(frozen=True)
class ServeBench:
    config: str = "tiny_tridentnet"
    requests: int = 16
    tasks_per_request: int = 4
    concurrency: tuple[int, ...] = (16, 64)
    hang_every: int = 10  # one request in this many carries a URL that never answers
    request_deadline: float = 30.0
    device: str = "auto"
    precision: str = "fp32"
    smart_requests: int = 20  # interactive requests, idle and under load


class _NeverAnswers:
    """A loopback HTTP server whose every request hangs until the bench ends."""

    def __init__(self) -> None:
        stop = self.stop = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stop.wait(600)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hang"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def _percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 3) if values else 0.0


def _body(uris: list[str]) -> dict:
    tasks = [{"id": i, "data": {"image": uri}} for i, uri in enumerate(uris)]
    return {"tasks": tasks, "project": "1.0", "label_config": LABEL_CONFIG}


def run_serve_benchmark(bench: ServeBench) -> Iterator[dict]:
    per_request = bench.tasks_per_request
    with tempfile.TemporaryDirectory(prefix="tridentloop-serve-bench-") as tmp:
        root = Path(tmp)
        conditioned_model_dir(root / "model", bench.config)
        rng = np.random.default_rng(0)
        paths = []
        for i in range(bench.requests * per_request):
            path = root / f"img{i:03d}.png"
            Image.fromarray(survey_scene(rng, 480, 640, 12).image).save(path)
            paths.append(str(path))
        hanging = _NeverAnswers()
        backend = Backend(
            ModelSource(model_dir=root / "model", device=bench.device, precision=bench.precision),
            MediaFetcher(MediaSettings(local_roots=[root], allow_private_urls=True)),
            TrainingJobs("true", root, root / "jobs"),
            ServerSettings(score_threshold=0.0, request_deadline=bench.request_deadline),
        )
        try:
            with serve_in_thread(backend) as url:
                yield _overhead(bench, backend, url, paths)
                yield _smart_tools(bench, url, paths)
                for concurrency in bench.concurrency:
                    yield _fairness(bench, url, paths, hanging.url, concurrency)
        finally:
            hanging.close()


def _overhead(bench: ServeBench, backend: Backend, url: str, paths: list[str]) -> dict:
    predictor = backend.models.get().predictor
    tiling = backend.models.get().tiling
    predictor.detect(load_image(paths[0]), tiling)  # warm-up
    start = time.perf_counter()
    for path in paths:
        predictor.detect(load_image(path), tiling)
    engine_s = time.perf_counter() - start
    per = bench.tasks_per_request
    bodies = [_body(paths[i * per : (i + 1) * per]) for i in range(bench.requests)]
    rss_before = peak_rss_mb()
    with httpx.Client(base_url=url, timeout=300) as client:
        client.post("/predict", json=bodies[0])  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(bench.requests) as pool:
            answers = list(pool.map(lambda b: client.post("/predict", json=b), bodies))
        server_s = time.perf_counter() - start
    return {
        "case": f"serve:{bench.config}",
        "device": str(predictor.device),
        "requests": bench.requests,
        "tasks_per_request": per,
        "engine_s": round(engine_s, 3),
        "server_s": round(server_s, 3),
        "overhead_ratio": round(server_s / engine_s, 3),
        "errors": sum(a.status_code != 200 for a in answers),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_growth_under_load_mb": round(peak_rss_mb() - rss_before, 1),
    }


def _smart_body(uri: str, i: int) -> dict:
    """Alternately a smart rectangle over a fifth of the image and a click inside it, at
    places that move a little each time (annotators refine)."""
    x, y = 20 + (i % 5) * 4, 25 + (i % 3) * 5
    value = ({"x": x, "y": y, "width": 20, "height": 20, "rectanglelabels": []} if i % 2 == 0
             else {"x": x + 10, "y": y + 10, "width": 0.6, "keypointlabels": []})
    item = {"type": "rectanglelabels" if i % 2 == 0 else "keypointlabels", "from_name": "label",
            "to_name": "image", "value": value, "is_positive": True}
    return {**_body([uri]), "params": {"context": {"result": [item]}}}


def _smart_tools(bench: ServeBench, url: str, paths: list[str]) -> dict:
    def asked(uri: str) -> list[float]:
        seconds = []
        with httpx.Client(base_url=url, timeout=300) as client:
            for i in range(bench.smart_requests):
                start = time.perf_counter()
                answer = client.post("/predict", json=_smart_body(uri, i))
                answer.raise_for_status()
                seconds.append(time.perf_counter() - start)
        return seconds

    idle = asked(paths[-1])
    per = bench.tasks_per_request
    bodies = [_body(paths[i * per : (i + 1) * per]) for i in range(bench.requests)]
    with ThreadPoolExecutor(bench.requests + 1) as pool, httpx.Client(
        base_url=url, timeout=600
    ) as client:
        batch = [pool.submit(client.post, "/predict", json=b) for b in bodies]
        time.sleep(0.5)  # the batch requests are queued first
        loaded = asked(paths[-2])
        batch_busy = sum(not f.done() for f in batch)
        for future in batch:
            future.result()
    return {
        "case": "serve:smart-tools",
        "smart_requests": bench.smart_requests,
        "batch_requests_at_once": bench.requests,
        "batch_requests_still_running_at_the_end": batch_busy,
        "idle_first_s": round(idle[0], 3),
        "idle_p50_s": _percentile(idle[1:], 50),
        "idle_p95_s": _percentile(idle[1:], 95),
        "under_load_first_s": round(loaded[0], 3),
        "under_load_p50_s": _percentile(loaded[1:], 50),
        "under_load_p95_s": _percentile(loaded[1:], 95),
    }


def _failed_healthy(outcome: tuple[float, int, list[int], bool], per: int) -> int:
    """Tasks with a real image that came back without boxes (the hanging URL is last)."""
    _, status, boxes, hangs = outcome
    healthy = per - 1 if hangs else per
    if status != 200:
        return healthy
    return sum(count == 0 for count in boxes[:healthy])


def _fairness(
    bench: ServeBench, url: str, paths: list[str], hang_url: str, concurrency: int
) -> dict:
    per = bench.tasks_per_request
    plans = []
    for i in range(concurrency):
        uris = [paths[(i * per + j) % len(paths)] for j in range(per)]
        hangs = i % bench.hang_every == 0
        if hangs:
            uris[-1] = f"{hang_url}?{i}"
        plans.append((uris, hangs))
    health: list[float] = []
    done = threading.Event()

    def poll_health() -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            while not done.is_set():
                start = time.perf_counter()
                client.get("/health")
                health.append(time.perf_counter() - start)
                time.sleep(0.05)

    def send(plan: tuple[list[str], bool]) -> tuple[float, int, list[int], bool]:
        uris, hangs = plan
        start = time.perf_counter()
        with httpx.Client(base_url=url, timeout=bench.request_deadline + 60) as client:
            answer = client.post("/predict", json=_body(uris))
        boxes = ([len(r["result"]) for r in answer.json()["results"]]
                 if answer.status_code == 200 else [])
        return time.perf_counter() - start, answer.status_code, boxes, hangs

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(send, plans))
    done.set()
    poller.join()
    healthy = [o for o in outcomes if not o[3]]
    return {
        "case": "serve:fairness",
        "concurrency": concurrency,
        "tasks_per_request": per,
        "hanging_requests": sum(o[3] for o in outcomes),
        "request_deadline_s": bench.request_deadline,
        "p50_s": _percentile([o[0] for o in healthy], 50),
        "p95_s": _percentile([o[0] for o in healthy], 95),
        "hanging_request_max_s": round(max((o[0] for o in outcomes if o[3]), default=0.0), 3),
        "errors": sum(o[1] != 200 for o in outcomes),
        "failed_healthy_tasks": sum(_failed_healthy(o, per) for o in outcomes),
        "health_p99_s": _percentile(health, 99),
        "health_max_s": round(max(health, default=0.0), 3),
    }
