"""The Label Studio ML-backend protocol over HTTP, as Label Studio 1.23 speaks it: routes
only; what they do lives in `backend`.

GET /health, POST /setup, POST /predict, POST /webhook, GET /versions, GET /jobs[/{id}].

- /health answers on the event loop from memory: it never waits behind predictions.
  /predict runs in a pool of its own, /setup, /webhook, /versions and /jobs in another.
- Bodies are read incrementally under a size cap (chunked uploads too) and parsed by hand:
  malformed JSON, a body that is not UTF-8, or nesting too deep is a 400 naming the problem.
- With basic auth configured, everything but /health needs it (Label Studio's annotation
  webhooks carry none, so /webhook counts them without it); START_TRAINING and /jobs need it
  always, so a backend without credentials never starts training or shows logs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .backend import Backend, HTTPError, ServerSettings

log = logging.getLogger(__name__)

OPEN_PATHS = {"/health", "/", "/webhook"}
ALWAYS_AUTH_PATHS = ("/jobs",)


def _authorized(settings: ServerSettings, request: Request) -> bool:
    auth = settings.basic_auth
    return auth is not None and auth.accepts(request.headers.get("authorization"))


def _add_guard(app: FastAPI, settings: ServerSettings) -> None:
    """Basic auth where it is needed: always for what starts work on the machine, and
    for everything but the health check once credentials are set."""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        needs_auth = path.startswith(ALWAYS_AUTH_PATHS) or (
            settings.basic_auth is not None and path not in OPEN_PATHS
        )
        if needs_auth and not _authorized(settings, request):
            reason = (
                "wrong or missing basic auth credentials"
                if settings.basic_auth is not None
                else f"{path} needs basic auth: set BASIC_AUTH_USER and BASIC_AUTH_PASS"
            )
            return JSONResponse({"error": reason}, status_code=401,
                                headers={"WWW-Authenticate": 'Basic realm="tridentloop"'})
        return await call_next(request)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, read no further than `limit` bytes."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise HTTPError(413, f"request of {int(length):,} bytes exceeds the limit of "
                             f"{limit:,}")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise HTTPError(413, f"request body exceeds {limit:,} bytes")
    try:
        body = json.loads(bytes(raw) or b"{}")
    except UnicodeDecodeError as exc:
        raise HTTPError(400, "the body is not UTF-8 JSON") from exc
    except RecursionError as exc:
        raise HTTPError(400, "the JSON body is nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, or an integer of thousands of digits
        raise HTTPError(400, f"malformed JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise HTTPError(400, "the JSON body must be an object")
    return body


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPError)
    async def http_error(_: Request, exc: HTTPError):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # a bug, never the client's
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)


def create_app(backend: Backend) -> FastAPI:
    app = FastAPI(title="tridentloop ML backend", docs_url=None, redoc_url=None,
                  openapi_url=None)
    settings = backend.settings
    predictions = ThreadPoolExecutor(settings.max_open_requests, thread_name_prefix="predict")
    control = ThreadPoolExecutor(4, thread_name_prefix="control")
    _add_guard(app, settings)
    _add_error_handlers(app)

    async def body_of(request: Request) -> dict[str, Any]:
        return await read_json(request, settings.max_request_bytes)

    async def off_loop(pool: ThreadPoolExecutor, work: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, work, *args)

    @app.get("/health")
    @app.get("/")
    async def health() -> dict[str, Any]:
        return {
            "status": "UP",
            "model_class": "TridentLoop",
            "model_version": backend.models.current().version,
            "queue": backend.queue.pending(),
        }

    @app.post("/setup")
    async def setup(request: Request) -> dict[str, Any]:
        return await off_loop(control, backend.setup, await body_of(request))

    open_requests = 0  # /predict requests being answered; only the event loop touches it

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        nonlocal open_requests
        if open_requests >= settings.max_open_requests:
            raise HTTPError(503, "too many /predict requests at once; retry shortly",
                            settings.retry_after)
        open_requests += 1
        try:
            return await off_loop(predictions, backend.predict, await body_of(request))
        finally:
            open_requests -= 1

    @app.post("/webhook")
    async def webhook(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        return await off_loop(control, backend.webhook, body, _authorized(settings, request))

    @app.get("/versions")
    async def versions() -> dict[str, Any]:
        return await off_loop(control, backend.versions)

    @app.get("/jobs")
    async def jobs() -> dict[str, Any]:
        return {"jobs": [job.describe(log_tail=0) for job in backend.jobs.all()]}

    @app.get("/jobs/{job_id}")
    async def job(job_id: str) -> dict[str, Any]:
        found = backend.jobs.get(job_id)
        if found is None:
            raise HTTPError(404, f"no job {job_id[:80]!r}")
        return await off_loop(control, found.describe)

    return app
