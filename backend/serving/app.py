"""The Label Studio ML-backend protocol over HTTP, as Label Studio 1.23 speaks it.

GET /health, POST /setup, POST /predict, POST /webhook, GET /versions, GET /jobs[/{id}].
Requests are parsed by hand so that malformed JSON gets a 400 naming the problem; a task
whose image cannot be fetched or decoded gets an empty result while the other tasks of the
request are served.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import secrets
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, TimeoutError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .. import uncertainty
from ..detection.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from ..detection.tiling import TilingOptions
from .inference_queue import InferenceQueue, QueueFull
from .jobs import TrainingJobs
from .label_config import LabelConfig, LabelConfigError, parse_label_config
from .media import MediaError, MediaFetcher
from .model_source import LoadedModel, ModelSource
from .results import ResultError, prediction, rectangle_results, validate

log = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    score_threshold: float = 0.5
    tiling: TilingOptions | None = field(default_factory=TilingOptions)
    label_mapping: dict[str, str] | None = None
    max_request_bytes: int = 32 * 1024**2
    max_pixels: int = DEFAULT_MAX_PIXELS
    predict_timeout: float = 90.0  # Label Studio gives up on /predict after 100 s
    basic_auth: tuple[str, str] | None = None
    uncertainty: uncertainty.Method = "least-confidence"  # the task score; one pass only


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ProjectState:
    schema: str | None = None
    score_threshold: float | None = None


class Backend:
    """Everything the endpoints share: the model, the queue, media, jobs, per-project setup."""

    def __init__(
        self,
        models: ModelSource,
        media: MediaFetcher,
        jobs: TrainingJobs,
        settings: ServerSettings,
        queue: InferenceQueue | None = None,
    ) -> None:
        self.models = models
        self.media = media
        self.jobs = jobs
        self.settings = settings
        self.queue = queue or InferenceQueue()
        self.projects: dict[str, ProjectState] = {}
        self.events: Counter[str] = Counter()
        self.fetchers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="media")
        self._configs: dict[str, LabelConfig] = {}

    def label_config(self, schema: str) -> LabelConfig:
        key = hashlib.sha256(schema.encode()).hexdigest()
        if key not in self._configs:
            self._configs[key] = parse_label_config(schema)
        return self._configs[key]

    def setup(self, body: dict[str, Any]) -> dict[str, Any]:
        project = _project_id(body.get("project"))
        schema = body.get("schema")
        if not isinstance(schema, str) or not schema.strip():
            raise HTTPError(400, "/setup needs the project's labeling config in 'schema'")
        model = self.models.get()
        config = self._usable_config(schema, model)
        extra = body.get("extra_params") or {}
        threshold = extra.get("score_threshold") if isinstance(extra, dict) else None
        if threshold is not None:
            try:
                threshold = float(threshold)
            except (TypeError, ValueError) as exc:
                raise HTTPError(
                    400, f"extra_params.score_threshold={threshold!r} is not a number"
                ) from exc
        self.projects[project] = ProjectState(schema, threshold)
        controls = [c.from_name for c, _ in config]
        log.info("setup project %s: controls %s, threshold %s", project, controls, threshold)
        return {"model_version": model.version}

    def _usable_config(self, schema: str, model: LoadedModel):
        try:
            config = self.label_config(schema)
        except LabelConfigError as exc:
            raise HTTPError(400, str(exc)) from exc
        usable = config.usable(model.labels, self.settings.label_mapping)
        if not usable:
            labels = sorted({lbl for c in config.controls for lbl in c.labels})
            raise HTTPError(
                400,
                f"none of the model's classes {model.labels} matches a label "
                f"of the config {labels}; rename labels, add "
                "predicted_values, or pass --label-mapping",
            )
        return usable

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise HTTPError(400, "/predict needs a list of tasks in 'tasks'")
        project = _project_id(body.get("project"))
        state = self.projects.get(project, ProjectState())
        schema = body.get("label_config") or state.schema
        if not schema:
            raise HTTPError(
                400,
                f"no label config for project {project}: call /setup first or send 'label_config'",
            )
        model = self.models.get()
        usable = self._usable_config(schema, model)
        threshold = (
            self.settings.score_threshold
            if state.score_threshold is None
            else state.score_threshold
        )
        futures = [
            self.fetchers.submit(self._predict_task, task, model, usable, threshold)
            for task in tasks
        ]
        results = []
        for task, future in zip(tasks, futures, strict=True):
            try:
                results.append(future.result(timeout=self.settings.predict_timeout))
            except TimeoutError:
                log.error(
                    "task %s: no prediction within %.0f s",
                    _task_id(task),
                    self.settings.predict_timeout,
                )
                results.append(prediction([], model.version, 0.0))
        return {"results": results}

    def _predict_task(self, task: Any, model: LoadedModel, usable, threshold: float):
        task_id = _task_id(task)
        try:
            data = task.get("data") if isinstance(task, dict) else None
            if not isinstance(data, dict):
                raise HTTPError(400, "task has no 'data' object")
            detections = {}
            regions: list[dict[str, Any]] = []
            for control, class_map in usable:
                key = control.data_key
                if key not in detections:
                    detections[key] = self._detect(data.get(key), task_id, model)
                det, width, height = detections[key]
                regions += rectangle_results(det, width, height, control, class_map, threshold)
            validate(regions, tuple(c for c, _ in usable))
            method = self.settings.uncertainty
            score = max(uncertainty.score(method, [det]) for det, _, _ in detections.values())
            return prediction(regions, model.version, score)
        except (MediaError, ImageError, HTTPError, ResultError, QueueFull) as exc:
            log.warning("task %s: empty prediction: %s", task_id, exc)
            return prediction([], model.version, 0.0)

    def _detect(self, uri: Any, task_id: int | None, model: LoadedModel):
        raw = self.media.fetch(uri, task_id)
        image = load_image(raw, max_pixels=self.settings.max_pixels, name=str(uri))
        future = self.queue.submit(model.predictor, image, self.settings.tiling)
        det = future.result(timeout=self.settings.predict_timeout)
        return det, image.shape[1], image.shape[0]

    def webhook(self, body: dict[str, Any], authorized: bool) -> dict[str, Any]:
        action = body.get("action")
        if action == "START_TRAINING":
            if not authorized:
                raise HTTPError(401, "START_TRAINING needs the backend's basic auth")
            project = body.get("project")
            project_id = str(project.get("id")) if isinstance(project, dict) else None
            job = self.jobs.request(reason="START_TRAINING", project=project_id)
            return {"job": job.id, "status": job.status}
        if isinstance(action, str):
            self.events[action] += 1
            return {"status": "ok", "action": action, "count": self.events[action]}
        raise HTTPError(400, "webhook body needs an 'action'")

    def versions(self) -> dict[str, Any]:
        registry = self.models.registry
        if registry is None:
            return {"versions": [self.models.get().version]}
        return {
            "versions": registry.version_names(),
            "current": self.models.get().version,
            "details": registry.describe(),
        }


def _project_id(project: Any) -> str:
    """Label Studio sends `"<id>.<created timestamp>"`; the id part names the project."""
    return str(project).split(".", 1)[0] if project is not None else ""


def _task_id(task: Any) -> int | None:
    return task.get("id") if isinstance(task, dict) else None


def _check_basic_auth(request: Request, expected: tuple[str, str] | None) -> bool:
    if expected is None:
        return True
    header = request.headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return secrets.compare_digest(user, expected[0]) & secrets.compare_digest(password, expected[1])


def create_app(backend: Backend) -> FastAPI:
    app = FastAPI(title="tridentloop ML backend", docs_url=None, redoc_url=None)
    settings = backend.settings
    open_paths = {"/health", "/webhook"}  # LS sends its webhooks without basic auth

    @app.middleware("http")
    async def guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_request_bytes:
            return _error(
                413,
                f"request of {int(length):,} bytes exceeds the limit of "
                f"{settings.max_request_bytes:,}",
            )
        if request.url.path not in open_paths and not _check_basic_auth(
            request, settings.basic_auth
        ):
            return JSONResponse(
                {"error": "wrong or missing basic auth credentials"},
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="tridentloop"'},
            )
        return await call_next(request)

    async def read_json(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > settings.max_request_bytes:
            raise HTTPError(413, f"request body exceeds {settings.max_request_bytes:,} bytes")
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError as exc:
            raise HTTPError(400, f"malformed JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise HTTPError(400, "the JSON body must be an object")
        return body

    @app.exception_handler(HTTPError)
    async def http_error(_: Request, exc: HTTPError):
        return _error(exc.status, exc.message)

    @app.get("/health")
    @app.get("/")
    def health() -> dict[str, Any]:
        model = backend.models.get()
        return {
            "status": "UP",
            "model_class": "TridentLoop",
            "model_version": model.version,
            "queue": backend.queue.pending(),
        }

    @app.post("/setup")
    async def setup(request: Request) -> dict[str, Any]:
        return backend.setup(await read_json(request))

    @app.post("/predict")
    async def predict(request: Request):
        from starlette.concurrency import run_in_threadpool

        body = await read_json(request)
        return await run_in_threadpool(backend.predict, body)

    @app.post("/webhook")
    async def webhook(request: Request) -> dict[str, Any]:
        authorized = _check_basic_auth(request, settings.basic_auth)
        return backend.webhook(await read_json(request), authorized)

    @app.get("/versions")
    def versions() -> dict[str, Any]:
        return backend.versions()

    @app.get("/jobs")
    def jobs() -> dict[str, Any]:
        return {"jobs": [job.describe(log_tail=0) for job in backend.jobs.all()]}

    @app.get("/jobs/{job_id}")
    def job(job_id: str) -> dict[str, Any]:
        found = backend.jobs.get(job_id)
        if found is None:
            raise HTTPError(404, f"no job {job_id!r}")
        return found.describe()

    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def basic_auth_from_env() -> tuple[str, str] | None:
    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    return (user, password) if user and password else None


def default_work_dir() -> Path:
    return Path(os.environ.get("TRIDENTLOOP_HOME", ".tridentloop"))
