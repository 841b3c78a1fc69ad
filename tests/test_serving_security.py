"""Serving is safe by default and fair under load, against the real `tridentloop serve`
process: task data reaches no file or address beyond what the operator allowed, nothing is
open that should not be, one request never starves the others, bad input is a 4xx or one
task's empty result, and state survives kills. All traffic stays on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from backend.media.cache import DiskCache
from backend.media.fetch import MediaError, MediaFetcher, MediaSettings
from backend.registry import Registry, RegistryError
from backend.serving.auth import BasicAuth, BindRefused, check_bind, child_environment

from .conftest import REPO
from .servers import ANIMAL_CONFIG as CONFIG
from .servers import ImageHost, backend_process, make_model_dir, wait_until

AUTH = ("annotator", "s3cret-Pässword")
ENV = {"BASIC_AUTH_USER": AUTH[0], "BASIC_AUTH_PASS": AUTH[1]}


def _png(fixture_image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(fixture_image[:320, :320])).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def site(tmp_path_factory, fixture_image):
    root = tmp_path_factory.mktemp("security")
    images = root / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(_png(fixture_image))
    (root / "secret.png").write_bytes(_png(fixture_image))  # outside --local-root
    make_model_dir(root / "model", version="m1")
    with ImageHost(_png(fixture_image)) as host:
        yield {"root": root, "images": images, "host": host, "model": root / "model"}


@pytest.fixture(scope="module")
def server(site):
    root = site["root"]
    marker = root / "child-env.txt"
    train = (f"{sys.executable} -c \"import os; open('{marker}', 'w').write("
             "repr(os.environ.get('BASIC_AUTH_PASS')))\"")
    args = ["--model", str(site["model"]), "--local-root", str(site["images"]),
            "--work-dir", str(root / "work"), "--train-command", train,
            "--request-deadline", "8", "--download-timeout", "4"]
    with backend_process(args, root / "backend.log", env=ENV) as proc:
        yield {**site, "url": proc.url, "proc": proc, "marker": marker}


def _client(server, auth=AUTH) -> httpx.Client:
    return httpx.Client(base_url=server["url"], auth=auth, timeout=60)


def _predict(server, uris: list[str], timeout: float = 60) -> httpx.Response:
    tasks = [{"id": i, "data": {"image": uri}} for i, uri in enumerate(uris)]
    with httpx.Client(base_url=server["url"], auth=AUTH, timeout=timeout) as c:
        return c.post("/predict", json={"tasks": tasks, "project": "3.1", "label_config": CONFIG})


def _boxes(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [len(r["result"]) for r in response.json()["results"]]


# --- least privilege for media ---------------------------------------------------------

HOSTILE_URIS = [
    "local:///etc/passwd",
    "simplecache::file:///etc/passwd",
    "filecache::file:///etc/hostname",
    "zip://x.png::file:///tmp/a.zip",
    "tar://x::file:///tmp/a.tar",
    "reference://x",
    "memory://bucket/x.png",
    "ftp://127.0.0.1/x.png",
    "file:///etc/passwd",
    "/etc/passwd",
    "../secret.png",
    "http://[zz/x",
    "http://127.0.0.1:notaport/x.png",
    "image\x00.png",
    "s3://bucket/x.png",  # cloud storage not enabled on this backend
    "x" * 10_000,
]


def test_uris_outside_the_allow_list_are_refused_per_task(server):
    good = str(server["images"] / "ok.png")
    answer = _predict(server, [good, *HOSTILE_URIS, good])
    boxes = _boxes(answer)
    assert boxes[0] > 0 and boxes[-1] > 0
    assert boxes[1:-1] == [0] * len(HOSTILE_URIS)
    cached = list((server["root"] / "work" / "cache").iterdir())
    assert len([p for p in cached if not p.name.startswith(".")]) == 1  # ok.png only
    log = server["proc"].log_text()
    assert "URL scheme 'local' is not allowed" in log
    assert "chained URLs (a::b) are not allowed" in log
    assert "storage is not enabled on this backend" in log
    assert "local files are served only from" in log


def test_loopback_and_private_addresses_are_refused_unless_allowed(server):
    host = server["host"]
    assert _boxes(_predict(server, [f"{host.url}/img.png?loopback"])) == [0]
    assert "non-public address: refused" in server["proc"].log_text()
    assert "/img.png?loopback" not in [p for p, _ in host.seen]  # never even connected
    allowed = MediaFetcher(MediaSettings(allow_private_urls=True))
    Image.open(io.BytesIO(allowed.fetch(f"{host.url}/img.png")))  # an image came back


def test_redirects_are_checked_hop_by_hop_and_drop_credentials(site):
    """Label Studio's own origin is trusted; where it redirects is checked like any URL."""
    host = site["host"]
    label_studio = host.url.replace("127.0.0.1", "localhost")
    strict = MediaFetcher(MediaSettings(label_studio_url=label_studio, api_key="legacy-token"))
    with pytest.raises(MediaError, match="non-public address"):
        strict.fetch(f"{label_studio}/data/../redirect?to=http://127.0.0.2:9/x.png", 1)
    relaxed = MediaFetcher(MediaSettings(label_studio_url=label_studio, api_key="legacy-token",
                                         allow_private_urls=True))
    relaxed.fetch(f"{label_studio}/data/../redirect?to={host.url}/img.png?hop", 1)
    (first, first_headers), (second, second_headers) = host.seen[-2:]
    assert first.startswith("/redirect") and first_headers["Authorization"] == "Token legacy-token"
    assert second == "/img.png?hop" and "Authorization" not in second_headers


def test_downloads_are_capped_and_non_images_never_cached(site, tmp_path):
    host = site["host"]
    fetcher = MediaFetcher(MediaSettings(allow_private_urls=True, cache_dir=tmp_path,
                                         max_bytes=8 * 1024**2))
    with pytest.raises(MediaError, match="larger than the download limit"):
        fetcher.fetch(f"{host.url}/big?mb=300")
    with pytest.raises(MediaError, match="not an image file"):
        fetcher.fetch(f"{host.url}/text")
    assert fetcher.fetch(f"{host.url}/img.png")
    assert [p for p in tmp_path.iterdir() if not p.name.startswith(".")] != []
    assert not list(tmp_path.glob("*.tmp")) and len(list(tmp_path.iterdir())) == 2  # + .lock


# --- secure defaults ----------------------------------------------------------------------

def test_binding_beyond_loopback_without_auth_is_refused(site, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "backend.cli", "serve", "--model", str(site["model"]),
         "--host", "0.0.0.0", "--device", "cpu", "--work-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert "BASIC_AUTH_USER" in proc.stderr and "--insecure-no-auth" in proc.stderr
    for host, auth, insecure in (("127.0.0.1", None, False), ("::1", None, False),
                                 ("0.0.0.0", BasicAuth(b"u", b"p"), False),
                                 ("10.0.0.5", None, True)):
        check_bind(host, auth, insecure)  # allowed
    with pytest.raises(BindRefused):
        check_bind("192.168.1.20", None, False)


def test_training_and_job_logs_always_need_auth(site, tmp_path):
    with backend_process(["--model", str(site["model"]), "--work-dir", str(tmp_path)],
                         tmp_path / "open.log") as open_backend:
        start = httpx.post(open_backend.url + "/webhook", json={"action": "START_TRAINING"})
        assert start.status_code == 401 and "BASIC_AUTH_USER" in start.json()["error"]
        assert httpx.get(open_backend.url + "/jobs").status_code == 401
        assert httpx.get(open_backend.url + "/health").status_code == 200


def test_secrets_reach_no_child_log_or_error(server):
    with _client(server) as c:
        job = c.post("/webhook", json={"action": "START_TRAINING"}).json()["job"]
        wait_until(lambda: c.get(f"/jobs/{job}").json()["status"] == "succeeded", 60,
                   "the training job finished")
    assert server["marker"].read_text() == "None"  # BASIC_AUTH_PASS not inherited
    assert AUTH[1] not in server["proc"].log_text()
    assert "BASIC_AUTH_PASS" not in child_environment({"BASIC_AUTH_PASS": "x", "A": "b"})
    assert "s3cret" not in repr(BasicAuth.from_env(ENV))


# --- deadlines and fairness ---------------------------------------------------------------

def test_a_request_of_hanging_urls_ends_at_its_deadline_with_what_finished(server):
    good = str(server["images"] / "ok.png")
    hanging = [f"{server['host'].url}/hang?{i}" for i in range(40)]
    with backend_process(
        ["--model", str(server["model"]), "--local-root", str(server["images"]),
         "--work-dir", str(server["root"] / "work2"), "--request-deadline", "6",
         "--allow-private-urls"],
        server["root"] / "deadline.log", env=ENV,
    ) as proc:
        local = {**server, "url": proc.url}
        with ThreadPoolExecutor(2) as pool:
            started = time.monotonic()
            slow = pool.submit(_predict, local, [good, *hanging])
            time.sleep(0.5)
            alone = _predict(local, [good])  # not stuck behind the hanging request
            alone_s = time.monotonic() - started
            answer = slow.result()
            slow_s = time.monotonic() - started
    assert _boxes(alone)[0] > 0 and alone_s < 6
    boxes = _boxes(answer)
    assert boxes[0] > 0 and boxes[1:] == [0] * 40
    assert slow_s < 10  # 6 s deadline: nothing waits for 40 x the download timeout


def test_health_never_waits_behind_predictions(server):
    hanging = [f"{server['host'].url}/hang?h{i}" for i in range(4)]
    with backend_process(
        ["--model", str(server["model"]), "--work-dir", str(server["root"] / "work3"),
         "--request-deadline", "8", "--allow-private-urls"],
        server["root"] / "health.log", env=ENV,
    ) as proc:
        local = {**server, "url": proc.url}
        with ThreadPoolExecutor(48) as pool:
            for _ in range(48):
                pool.submit(_predict, local, hanging)
            time.sleep(1.0)
            latencies = []
            for _ in range(20):
                started = time.monotonic()
                assert httpx.get(proc.url + "/health", timeout=5).status_code == 200
                latencies.append(time.monotonic() - started)
    assert max(latencies) < 1.0


def test_too_many_open_requests_get_503_with_retry_after(site, tmp_path):
    from backend.serving.backend import Backend, ServerSettings
    from backend.serving.jobs import TrainingJobs
    from backend.serving.model_source import ModelSource
    from backend.serving.server import serve_in_thread

    backend = Backend(
        ModelSource(model_dir=site["model"], device="cpu"),
        MediaFetcher(MediaSettings(allow_private_urls=True)),
        TrainingJobs("true", tmp_path, tmp_path / "jobs"),
        ServerSettings(max_open_requests=1, request_deadline=5),
    )
    with serve_in_thread(backend) as url, ThreadPoolExecutor(2) as pool:
        local = {"url": url}
        first = pool.submit(_predict, local, [f"{site['host'].url}/hang?503"])
        time.sleep(1.0)
        refused = _predict(local, [str(site["images"] / "ok.png")])
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert first.result().status_code == 200


# --- error isolation ------------------------------------------------------------------------

def _raw(body: bytes, **headers: str) -> tuple[bytes, dict]:
    return body, {"content-type": "application/json", **headers}


HOSTILE_BODIES = {
    "not utf-8": _raw(b'{"tasks": "\xff\xfe"}'),
    "deep nesting": _raw(b"[" * 100_000 + b"]" * 100_000),
    "deep object": _raw(b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
    "array": _raw(b"[1, 2]"),
    "empty": _raw(b""),
    "null": _raw(b"null"),
    "label_config int": _raw(b'{"tasks": [], "label_config": 5}'),
    "label_config list": _raw(b'{"tasks": [{"data": {}}], "label_config": ["<View/>"]}'),
    "label_config junk": _raw(b'{"tasks": [{"data": {}}], "label_config": "<View><Image"}'),
    "tasks dict": _raw(b'{"tasks": {"a": 1}, "label_config": "x"}'),
    "task junk": _raw(json.dumps({"tasks": [1, None, "x", {"data": 5}, {"data": {"image": 7}}],
                                  "label_config": CONFIG}).encode()),
    "project dict": _raw(json.dumps({"tasks": [], "project": {"a": 1},
                                     "label_config": CONFIG}).encode()),
    "huge number": _raw(b'{"tasks": [], "project": 1' + b"0" * 5000 + b"}"),
    "schema missing": _raw(b'{"project": "1"}'),
    "threshold nan": _raw(json.dumps({"project": "1", "schema": CONFIG,
                                      "extra_params": {"score_threshold": float("nan")}}).encode()),
    "threshold negative": _raw(json.dumps({"project": "1", "schema": CONFIG,
                                           "extra_params": {"score_threshold": -1}}).encode()),
    "threshold inf": _raw(b'{"project": "1", "schema": "<View/>", '
                          b'"extra_params": {"score_threshold": 1e999}}'),
    "threshold text": _raw(json.dumps({"project": "1", "schema": CONFIG,
                                       "extra_params": {"score_threshold": "high"}}).encode()),
    "extra_params list": _raw(json.dumps({"project": "1", "schema": CONFIG,
                                          "extra_params": [1]}).encode()),
    "action junk": _raw(b'{"action": {"x": 1}}'),
}


@pytest.mark.parametrize("path", ["/predict", "/setup", "/webhook"])
def test_hostile_bodies_get_4xx_and_the_server_keeps_serving(server, path):
    with _client(server) as c:
        for name, (body, headers) in HOSTILE_BODIES.items():
            r = c.post(path, content=body, headers=headers)
            assert r.status_code < 500, f"{path} {name}: {r.status_code} {r.text[:200]}"
            assert r.status_code in (200, 400, 401), f"{path} {name}: {r.status_code}"
        assert c.get("/health").status_code == 200


def test_hostile_auth_headers_are_401(server):
    for header in ("Basic " + base64.b64encode("ännotator:x".encode()).decode(),
                   "Basic " + base64.b64encode(b"\xff\xfe:\x00").decode(),
                   "Basic !!!notbase64", "Basic", "Bearer x", "Basic " + "A" * 10_000):
        r = httpx.get(server["url"] + "/versions", headers={"Authorization": header})
        assert r.status_code == 401
    raw = httpx.get(server["url"] + "/versions",
                    headers=[(b"Authorization", b"Basic \xc3\xa4\xff")])
    assert raw.status_code == 401
    utf8 = base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()
    assert httpx.get(server["url"] + "/versions",
                     headers={"Authorization": f"Basic {utf8}"}).status_code == 200


def test_a_chunked_body_over_the_limit_is_refused_without_buffering_it(server):
    def chunks():
        for _ in range(40):
            yield b" " * (1 << 20)

    with _client(server) as c:
        r = c.post("/webhook", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_label_studio_unreachable_during_token_refresh_is_one_tasks_failure(site, tmp_path):
    pat = "a.b.c"  # looks like a personal access token: the backend refreshes it first
    fetcher = MediaFetcher(MediaSettings(label_studio_url="http://127.0.0.1:9", api_key=pat))
    with pytest.raises(MediaError, match="did not refresh the API token"):
        fetcher.fetch("/data/upload/1/x.png", 1)


# --- durable state ----------------------------------------------------------------------------

def test_a_killed_backend_kills_its_training_and_a_restart_marks_it_failed(site, tmp_path):
    pidfile = tmp_path / "child.pid"
    train = (f"{sys.executable} -c \"import os,time; open('{pidfile}','w').write(str(os.getpid()));"
             " time.sleep(300)\"")
    args = ["--model", str(site["model"]), "--work-dir", str(tmp_path / "work"),
            "--train-command", train]
    with backend_process(args, tmp_path / "first.log", env=ENV) as first:
        job = httpx.post(first.url + "/webhook", json={"action": "START_TRAINING"},
                         auth=AUTH).json()["job"]
        wait_until(pidfile.exists, 30, "the training command started")
        child = int(pidfile.read_text())
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
    wait_until(lambda: not _alive(child), 30, "the training command died with the backend")
    with (
        backend_process(args, tmp_path / "second.log", env=ENV) as second,
        httpx.Client(base_url=second.url, auth=AUTH) as c,
    ):
        record = c.get(f"/jobs/{job}").json()
        assert record["status"] == "failed" and record["note"]
        again = c.post("/webhook", json={"action": "START_TRAINING"}).json()
        assert again["job"] != job
        listed = [j["id"] for j in c.get("/jobs").json()["jobs"]]
        assert listed == [job, again["job"]]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] not in ("Z", "X")


def test_registry_refuses_a_version_whose_weights_do_not_load(tmp_path):
    registry = Registry(tmp_path / "registry")
    registry.add(make_model_dir(tmp_path / "good", version="good"))
    registry.add(make_model_dir(tmp_path / "bad", version="bad"))
    (registry.versions_dir / "bad" / "model_final.pth").write_bytes(b"not a checkpoint")
    registry.switch("good")
    with pytest.raises(RegistryError, match="cannot be served"):
        registry.switch("bad")
    assert registry.current_name() == "good"


def test_the_cache_removes_orphans_and_survives_a_sharing_process(tmp_path):
    (tmp_path / ".999999.dead.tmp").write_bytes(b"left by a kill")
    cache = DiskCache(tmp_path, max_bytes=64 * 1024)
    assert not (tmp_path / ".999999.dead.tmp").exists()
    script = (
        "import sys, os\n"
        "from pathlib import Path\n"
        "from backend.media.cache import DiskCache\n"
        "c = DiskCache(Path(sys.argv[1]), 64 * 1024)\n"
        "for i in range(300):\n"
        "    p = Path(sys.argv[1]) / f'.{os.getpid()}.{i}.tmp'\n"
        "    p.write_bytes(os.urandom(4096))\n"
        "    c.adopt(f'{sys.argv[2]}{i}', p)\n"
        "    c.get(f'{sys.argv[2]}{i // 2}')\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), name], cwd=REPO,
                              stderr=subprocess.PIPE) for name in ("a", "b", "c")]
    errors = [p.communicate()[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    total = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert total <= 64 * 1024 + 3 * 4096
    assert cache.remove_orphans() == 0
