"""`tridentloop serve`: build the backend from command-line settings and run it."""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from ..detection.device import run_settings
from ..imagery.images import PixelScaling
from ..labelstudio.label_config import read_mapping
from ..media.fetch import MediaFetcher, MediaSettings
from ..ports import free_port
from ..recipe import RecipeOverrides
from ..registry import Registry
from .app import create_app
from .auth import BasicAuth, check_bind
from .backend import Backend, HTTPError, ServerSettings
from .jobs import TrainingJobs
from .model_source import ModelSource
from .triage_tabs import TriageTabs

log = logging.getLogger(__name__)


def default_work_dir() -> Path:
    return Path(os.environ.get("TRIDENTLOOP_HOME", ".tridentloop"))


def build_backend(args: argparse.Namespace, recipe: RecipeOverrides) -> Backend:
    auth = BasicAuth.from_env()
    check_bind(args.host, auth, args.insecure_no_auth)
    work = Path(args.work_dir or default_work_dir())
    models = ModelSource(
        model_dir=args.model,
        registry=Registry(args.registry) if args.registry else None,
        recipe_overrides=recipe,
        overrides=dict(args.opt),
        **run_settings(args),
    )
    url, key = os.environ.get("LABEL_STUDIO_URL"), os.environ.get("LABEL_STUDIO_API_KEY")
    media = MediaFetcher(
        MediaSettings(
            label_studio_url=url,
            api_key=key,
            cache_dir=work / "cache",
            cache_max_bytes=int(args.cache_gb * 1024**3),
            timeout=args.download_timeout,
            local_roots=[Path(p) for p in args.local_root],
            cloud_schemes=frozenset(args.allow_cloud),
            allow_private_urls=args.allow_private_urls,
        )
    )
    jobs = TrainingJobs(args.train_command, Path(args.project_dir), work / "jobs")
    try:
        settings = ServerSettings(
            score_threshold=args.score_threshold,
            label_mapping=read_mapping(args.label_mapping) if args.label_mapping else None,
            max_pixels=args.max_pixels,
            scaling=PixelScaling(args.value_range, args.bands, args.nodata),
            request_deadline=args.request_deadline,
            basic_auth=auth,
            uncertainty=args.uncertainty,
            interactive_threshold=args.interactive_threshold,
        )
    except HTTPError as exc:
        raise ValueError(exc.message) from exc
    return Backend(models, media, jobs, settings, triage=_triage_tabs(url, key, models))


def _triage_tabs(url: str | None, key: str | None, models: ModelSource) -> TriageTabs | None:
    """Tabs sorting served tasks by the model's triage threshold, where the backend may
    write to Label Studio."""
    if url and key:
        from label_studio_sdk import LabelStudio

        return TriageTabs(lambda: LabelStudio(base_url=url, api_key=key))
    if models.current().triage is not None:
        log.info("the model has a triage threshold, but without LABEL_STUDIO_URL and "
                 "LABEL_STUDIO_API_KEY the backend cannot sort tasks into the 'likely "
                 "empty' and 'to review' tabs")
    return None


def run_server(args: argparse.Namespace, recipe: RecipeOverrides) -> int:
    backend = build_backend(args, recipe)
    log.info(
        "tridentloop backend on http://%s:%d serving %s",
        args.host,
        args.port,
        backend.models.get().version,
    )
    try:
        uvicorn.run(
            create_app(backend),
            host=args.host,
            port=args.port,
            log_level="info",
            timeout_graceful_shutdown=5,
        )
    finally:
        if backend.triage is not None:
            backend.triage.close()  # the last verdicts into their tabs
    return 0


@contextmanager
def serve_in_thread(backend: Backend) -> Iterator[str]:
    """Run the backend on a free loopback port in this process (tests and benchmarks);
    yields its base URL and stops it afterwards."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(backend), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("backend did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
