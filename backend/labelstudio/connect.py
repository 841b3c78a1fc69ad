"""The first contact with a Label Studio project, with errors that say what to do.

That first request is where a wrong token, a wrong project id or a stopped server shows; the
SDK's exceptions bury the reason in kilobytes of headers (a 401 prints every response
header) or surface as a raw `httpx.ConnectError`. A run retries an unreachable server for a
bounded time, as the batch job does, then stops with one line naming the URL.
"""

from __future__ import annotations

from typing import Any

from .retry import ONE_TRY, OutageError, with_retry

TOKEN_HELP = ("set LABEL_STUDIO_API_KEY to a token from Label Studio's Account & Settings: a "
              "Personal Access Token or, where the organisation enables them, a Legacy Token")


class LabelStudioError(ValueError):
    """Label Studio refused or could not be reached; the message names the fix."""


def open_project(url: str, api_key: str, project: int, what: str,
                 give_up_after: float = 120.0) -> tuple[Any, Any]:
    """(SDK client, the project) for `what` (the stage or command, named in errors)."""
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    try:
        client = LabelStudio(base_url=url, api_key=api_key)  # an expired PAT fails here
        found = with_retry(lambda: client.projects.get(id=project, request_options=ONE_TRY),
                           f"{what}: reaching Label Studio at {url}", give_up_after)
    except OutageError as exc:
        cause = exc.__cause__
        raise LabelStudioError(
            f"{what}: Label Studio at {url} unreachable for {give_up_after:.0f} s "
            f"({type(cause).__name__}: {cause}); is it running, and is LABEL_STUDIO_URL (or "
            "params.yaml labelstudio.url) its address?") from None
    except ApiError as exc:
        raise LabelStudioError(f"{what}: {refusal(exc, url, project)}") from None
    return client, found


def refusal(exc: Any, url: str, project: int) -> str:
    """What a refused request means, from its status and the body's `detail` alone."""
    body = exc.body if isinstance(exc.body, dict) else {}
    detail = str(body.get("detail") or exc.body or "").strip()
    status = exc.status_code
    if status == 401:
        return f"Label Studio at {url} refused the API key ({detail}): {TOKEN_HELP}"
    if status == 403:
        return (f"Label Studio at {url}: this token's user may not open project {project} "
                f"({detail}); add the user to the project's workspace or use its owner's token")
    if status == 404:
        return (f"Label Studio at {url} has no project {project} that this token's user can "
                "see: check the id (the number in the project's address, /projects/<id>/; "
                "params.yaml labelstudio.project or --project)")
    return f"Label Studio at {url} answered {status} for project {project}: {detail[:200]}"
