"""What the endpoints do: per-project setup, predictions under a deadline, the training
webhook, versions. Routes and HTTP live in `app`.

Fairness. One /predict request runs at most `tasks_in_flight_per_request` of its tasks at
once on the shared fetcher pool, so one request full of hanging URLs cannot hold every
fetcher; the pool serves requests' tasks in arrival order. Each request has one deadline
(below Label Studio's 100 s): what has finished by then is returned, tasks not started are
dropped, downloads and inference still running give up at the same deadline. A full
inference queue or too many open requests answer 503 with Retry-After instead of empty
predictions. Every other per-task failure (a bad URL, an unreadable image, a result that
does not fit the config) is that task's empty prediction, with the reason logged.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import uncertainty
from ..detection.structures import Detections
from ..imagery.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_SCALING,
    ImageError,
    PixelScaling,
    load_image,
)
from ..labelstudio.label_config import (
    LabelConfig,
    LabelConfigError,
    RectangleControl,
    parse_label_config,
)
from ..labelstudio.results import ResultError, prediction, rectangle_results, validate
from ..media.fetch import MediaError, MediaFetcher
from ..thresholds import ScoreThresholds
from . import interactive
from .auth import BasicAuth
from .inference_queue import InferenceQueue, QueueFull
from .jobs import TrainingJobs
from .model_source import LoadedModel, ModelSource
from .recent import Recent
from .request_run import Busy, RequestRun
from .triage_tabs import TriageTabs

log = logging.getLogger(__name__)

Usable = list[tuple[RectangleControl, dict[int, str]]]


@dataclass
class ServerSettings:
    score_threshold: float | None = None  # one for every class; None: the model's own
    label_mapping: dict[str, str] | None = None
    max_request_bytes: int = 32 * 1024**2
    max_pixels: int = DEFAULT_MAX_PIXELS
    scaling: PixelScaling = DEFAULT_SCALING  # deep rasters: --value-range, --bands, --nodata
    request_deadline: float = 80.0  # s; Label Studio gives up on /predict after 100 s
    tasks_in_flight_per_request: int = 4
    fetch_workers: int = 32
    max_open_requests: int = 256  # /predict requests at once; more get 503
    retry_after: int = 5  # s, in 503 answers
    basic_auth: BasicAuth | None = None
    uncertainty: uncertainty.Method = uncertainty.DEFAULT  # the task score; one pass only
    max_projects: int = 1024  # /setup state kept, least recently used dropped
    max_configs: int = 64  # parsed label configs kept
    interactive_threshold: float = 0.2  # smart-tool candidates (see serving.interactive)
    cached_images: int = 4  # decoded images of the tasks being labelled, kept

    def __post_init__(self) -> None:
        if self.score_threshold is not None:
            check_threshold(self.score_threshold, "--score-threshold")
        check_threshold(self.interactive_threshold, "--interactive-threshold")
        if self.request_deadline <= 0 or self.tasks_in_flight_per_request < 1:
            raise ValueError("the request deadline and tasks in flight must be positive")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def check_threshold(value: object, name: str) -> float:
    """A score threshold is a finite number in [0, 1]: NaN would drop every box silently."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise HTTPError(400, f"{name}={value!r} is not a number") from exc
    if isinstance(value, bool) or not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise HTTPError(400, f"{name}={value!r} must be a number between 0 and 1")
    return number


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
        triage: TriageTabs | None = None,
    ) -> None:
        self.models = models
        self.triage = triage  # None: no Label Studio API access to write the tabs with
        self.media = media
        self.jobs = jobs
        self.settings = settings
        self.queue = queue or InferenceQueue()
        self.events: Counter[str] = Counter()
        self.fetchers = ThreadPoolExecutor(settings.fetch_workers, thread_name_prefix="task")
        self._projects: Recent[ProjectState] = Recent(settings.max_projects)
        self._configs: Recent[LabelConfig] = Recent(settings.max_configs)
        # The task being labelled is asked about again and again: its decoded image and its
        # normal-scale detections (per model version) are kept for the next smart region.
        self._decoded: Recent[np.ndarray] = Recent(settings.cached_images)
        self._normal: Recent[Detections] = Recent(8 * settings.cached_images)
        self._lock = threading.Lock()  # the webhook's event counts

    def label_config(self, schema: object) -> LabelConfig:
        """The parsed config, from a small LRU cache (Label Studio resends it every time)."""
        if not isinstance(schema, str):
            raise HTTPError(400, "the label config must be an XML string")

        def parse() -> LabelConfig:
            try:
                return parse_label_config(schema)
            except LabelConfigError as exc:
                raise HTTPError(400, str(exc)) from exc

        return self._configs.get_or_make(schema, parse)

    def project(self, project: str) -> ProjectState:
        return self._projects.get(project) or ProjectState()

    def setup(self, body: dict[str, Any]) -> dict[str, Any]:
        project = _project_id(body.get("project"))
        schema = body.get("schema")
        if not isinstance(schema, str) or not schema.strip():
            raise HTTPError(400, "/setup needs the project's labeling config in 'schema'")
        model = self.models.get()
        usable = self._usable(self.label_config(schema), model)
        extra = body.get("extra_params") or {}
        threshold = extra.get("score_threshold") if isinstance(extra, dict) else None
        if threshold is not None:
            threshold = check_threshold(threshold, "extra_params.score_threshold")
        self._projects.put(project, ProjectState(schema, threshold))
        controls = [c.from_name for c, _ in usable]
        log.info("setup project %s: controls %s, score thresholds %s", project, controls,
                 self._thresholds(model, threshold, project).describe(model.labels))
        return {"model_version": model.version}

    def _usable(self, config: LabelConfig, model: LoadedModel) -> Usable:
        usable = config.usable(model.labels, self.settings.label_mapping)
        if not usable:
            labels = sorted({lbl for c in config.controls for lbl in c.labels})
            raise HTTPError(
                400,
                f"none of the model's classes {model.labels} matches a label of the config "
                f"{labels}; rename labels, add predicted_values, or pass --label-mapping",
            )
        return usable

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + self.settings.request_deadline
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise HTTPError(400, "/predict needs a list of tasks in 'tasks'")
        project = _project_id(body.get("project"))
        state = self.project(project)
        schema = body.get("label_config") or state.schema
        if not schema:
            raise HTTPError(
                400,
                f"no label config for project {project}: call /setup first or send 'label_config'",
            )
        model = self.models.get()
        config = self.label_config(schema)
        usable = self._usable(config, model)
        params = body.get("params")
        context = params.get("context") if isinstance(params, dict) else None
        if context is not None:
            return self._interactive(tasks, context, model, config, usable, deadline)
        thresholds = self._thresholds(model, state.score_threshold, project)
        run = RequestRun(self.fetchers, self.settings.tasks_in_flight_per_request, tasks,
                         lambda t: self._predict_task(t, project, model, config, usable,
                                                      thresholds, deadline))
        results = run.wait(deadline)
        if run.busy:
            raise self._queue_full()
        empty = prediction([], model.version, 0.0)
        return {"results": [r if r is not None else empty for r in results]}

    def _thresholds(self, model: LoadedModel, project_threshold: float | None,
                    project: str) -> ScoreThresholds:
        """The project's extra_params.score_threshold, else --score-threshold, else the
        model's own (chosen on validation)."""
        return model.thresholds.resolve(self.settings.score_threshold, "--score-threshold"
                                        ).resolve(project_threshold,
                                                  f"project {project}'s extra_params")

    def _predict_task(
        self,
        task: Any,
        project: str,
        model: LoadedModel,
        config: LabelConfig,
        usable: Usable,
        thresholds: ScoreThresholds,
        deadline: float,
    ) -> dict[str, Any]:
        task_id = _task_id(task)
        try:
            data = task.get("data") if isinstance(task, dict) else None
            if not isinstance(data, dict):
                raise ValueError("the task has no 'data' object")
            detections: dict[str, tuple] = {}
            regions: list[dict[str, Any]] = []
            for control, class_map in usable:
                key = control.data_key
                if key not in detections:
                    detections[key] = self._detect(data.get(key), task_id, model, deadline)
                det, width, height = detections[key]
                regions += rectangle_results(det, width, height, control, class_map, thresholds)
            validate(regions, config)
            method = self.settings.uncertainty
            score = max(uncertainty.score(method, [det], thresholds)
                        for det, _, _ in detections.values())
            if self.triage is not None and model.triage is not None and task_id is not None:
                best = max(det.best_score() for det, _, _ in detections.values())
                self.triage.note(project, task_id, best < model.triage)
            return prediction(regions, model.version, score)
        except QueueFull as exc:
            raise Busy from exc
        except Exception as exc:  # every other failure is this task's alone
            log.warning("task %s: empty prediction: %s: %s", task_id, type(exc).__name__, exc)
            return prediction([], model.version, 0.0)

    def _interactive(self, tasks: list[Any], context: Any, model: LoadedModel,
                     config: LabelConfig, usable: Usable, deadline: float) -> dict[str, Any]:
        """A smart region drawn on a task: the model's answer about that spot (see
        serving.interactive), through the inference queue's priority lane."""
        try:
            prompts = interactive.parse_context(context)
        except interactive.ContextError as exc:
            raise HTTPError(400, str(exc)) from exc
        if len(tasks) != 1 or not isinstance(tasks[0], dict):
            raise HTTPError(400, "a smart-tool request carries exactly one task")
        data = tasks[0].get("data")
        if not isinstance(data, dict):
            raise HTTPError(400, "the task has no 'data' object")
        task_id = _task_id(tasks[0])

        def detect(image: np.ndarray) -> Detections:  # the priority lane: someone waits
            return self._run(model, image, deadline, urgent=True)

        def seen(uri: Any) -> tuple[np.ndarray, Detections]:
            """The task's image and its normal-scale detections, kept for the next prompt."""
            image = self._asked_image(uri, task_id, deadline)
            return image, self._normal.get_or_make((str(uri), model.version),
                                                   lambda: detect(image))

        try:
            regions = interactive.answer_task(prompts, data, usable, seen, detect,
                                              model.tiling, self.settings.interactive_threshold)
        except TimeoutError as exc:
            raise HTTPError(504, "no answer before the request's deadline") from exc
        except QueueFull as exc:
            raise self._queue_full() from exc
        try:
            validate(regions, config)
        except ResultError as exc:
            raise HTTPError(500, f"smart-tool answer failed validation: {exc}") from exc
        score = max((r["score"] for r in regions), default=0.0)
        return {"results": [prediction(regions, model.version, score)]}

    def _queue_full(self) -> HTTPError:
        """A request the inference queue has no room for: 503, try again shortly."""
        return HTTPError(503, "the inference queue is full; retry shortly",
                         self.settings.retry_after)

    def _asked_image(self, uri: Any, task_id: int | None, deadline: float) -> np.ndarray:
        """The image a smart tool was used on, decoded once for the prompts that follow; an
        annotator waits on this answer, so a failure names the image instead of a 500."""
        try:
            return self._decoded.get_or_make(
                str(uri), lambda: self._load(uri, task_id, deadline))
        except MediaError as exc:  # its message names the URI, any token in it redacted
            raise HTTPError(502, f"the task's image could not be fetched: {exc}") from exc
        except ImageError as exc:
            raise HTTPError(422, f"the task's image cannot be used: {exc}") from exc

    def _load(self, uri: Any, task_id: int | None, deadline: float) -> np.ndarray:
        raw = self.media.fetch(uri, task_id, deadline)
        return load_image(raw, max_pixels=self.settings.max_pixels, name=str(uri),
                          scaling=self.settings.scaling)

    def _run(self, model: LoadedModel, image: np.ndarray, deadline: float,
             urgent: bool = False, what: str = "") -> Detections:
        """The model's detections by its tiling, through the inference queue (its priority
        lane when an annotator is waiting), given up at the deadline."""
        future = self.queue.submit(model.predictor, image, model.tiling, urgent=urgent)
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout as exc:
            future.cancel()  # still queued: the device never runs it
            raise TimeoutError(f"{what}: no prediction before the request's deadline") from exc

    def _detect(self, uri: Any, task_id: int | None, model: LoadedModel, deadline: float):
        image = self._load(uri, task_id, deadline)
        return self._run(model, image, deadline, what=str(uri)), image.shape[1], image.shape[0]

    def webhook(self, body: dict[str, Any], authorized: bool) -> dict[str, Any]:
        action = body.get("action")
        if action == "START_TRAINING":
            if not authorized:
                raise HTTPError(401, "START_TRAINING needs the backend's basic auth: set "
                                     "BASIC_AUTH_USER and BASIC_AUTH_PASS on the backend and "
                                     "in Label Studio's model connection")
            project = body.get("project")
            project_id = str(project.get("id")) if isinstance(project, dict) else None
            job = self.jobs.request(reason="START_TRAINING", project=project_id)
            return {"job": job.id, "status": job.status}
        if isinstance(action, str) and len(action) <= 64:
            with self._lock:
                self.events[action] += 1
                return {"status": "ok", "action": action, "count": self.events[action]}
        raise HTTPError(400, "webhook body needs an 'action' (a short string)")

    def versions(self) -> dict[str, Any]:
        registry = self.models.registry
        if registry is None:
            return {"versions": [self.models.current().version]}
        return {
            "versions": registry.version_names(),
            "current": self.models.get().version,
            "details": registry.describe(),
        }


def _project_id(project: Any) -> str:
    """Label Studio sends `"<id>.<created timestamp>"`; the id part names the project."""
    return str(project).split(".", 1)[0][:64] if project is not None else ""


def _task_id(task: Any) -> int | None:
    return task.get("id") if isinstance(task, dict) else None
