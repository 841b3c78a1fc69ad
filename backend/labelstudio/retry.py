"""Calls to Label Studio that survive an outage: a survey run takes hours, and a Label
Studio restart in the middle must cost a pause, not the run."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import httpx

log = logging.getLogger(__name__)

R = TypeVar("R")

# The SDK would retry a 5xx twice within a second on its own; the waiting is ours to do.
ONE_TRY = {"max_retries": 0}


class OutageError(RuntimeError):
    """Label Studio stayed unreachable for longer than the run is willing to wait."""


def transient(exc: BaseException) -> bool:
    """Worth retrying: the server is down, restarting or overloaded, not refusing us."""
    if isinstance(exc, httpx.UnsupportedProtocol):
        return False  # a URL without http(s)://: no wait will fix it
    if isinstance(exc, httpx.TransportError):
        return True
    # Imported here: a folder-only run (`prelabel --images`) needs no Label Studio client.
    from label_studio_sdk.core.api_error import ApiError

    status = getattr(exc, "status_code", None)
    return isinstance(exc, ApiError) and (status is None or status >= 500 or status == 429)


def with_retry(
    call: Callable[[], R],
    what: str,
    give_up_after: float = 600.0,
    first_wait: float = 1.0,
    max_wait: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> R:
    """`call()`, retried with doubling waits while failures are transient; other errors
    (a wrong token, a missing project) are raised at once."""
    deadline = time.monotonic() + give_up_after
    wait = first_wait
    while True:
        try:
            return call()
        except Exception as exc:
            if not transient(exc):
                raise
            if time.monotonic() + wait > deadline:
                raise OutageError(
                    f"{what}: Label Studio unreachable for {give_up_after:.0f} s ({exc}); "
                    "everything done so far is saved, run the same command to resume"
                ) from exc
            log.warning("%s failed (%s); retrying in %.0f s", what, exc, wait)
            sleep(wait)
            wait = min(2 * wait, max_wait)
