"""One INFO line per HTTP request, written when its response has been sent (a stream's last event included):

    127.0.0.1:52814 "POST /v1/chat/completions" 200 12 prompt + 64 output tokens, finish stop, TTFT 0.041 s, 1.234 s

A completion's line names its token counts, finish reasons and time to first token (the handler leaves its
Generation in the request's state); other routes' lines stop at the status, and health probes and metrics scrapes
log at DEBUG. It replaces uvicorn's access log (the same line without what the engine did); `--no-access-log` turns
it off."""
from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("nanoslg.access")

GENERATION = "generation"  # the request-state key a completion handler sets
QUIET_PATHS = ("/health", "/metrics")  # probes and scrapes, every few seconds: their lines at DEBUG


def describe(generation: Any) -> str:
    """The engine's part of a completion's line."""
    if generation.status == "rejected":
        return "rejected by the engine"
    finishes = ", ".join(dict.fromkeys(c.finish_reason or "none" for c in generation.choices))
    ttft = "" if generation.first_token is None else f", TTFT {generation.first_token - generation.start:.3f} s"
    outcome = "" if generation.status == "ok" else f", {generation.status}"
    return (f"{generation.prompt_tokens} prompt + {generation.completion_tokens} output tokens, finish {finishes}"
            f"{ttft}{outcome}")


class AccessLog:
    """ASGI middleware: the access line of every HTTP request, once its response is complete (or the client left:
    status 499 when no response had started)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        state: dict[str, Any] = scope.setdefault("state", {})
        status = 499
        logged = False

        def write() -> None:
            nonlocal logged
            path = scope.get("path", "")
            level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
            if logged or not log.isEnabledFor(level):
                return
            logged = True
            client = scope.get("client") or ("-", 0)
            generation = state.get(GENERATION)
            detail = f" {describe(generation)}," if generation is not None else ""
            log.log(level, '%s:%s "%s %s" %d%s %.3f s', client[0], client[1], scope.get("method", ""), path, status,
                    detail, time.monotonic() - start,
                    extra={"request_id": getattr(generation, "request_id", None)} if generation is not None else None)

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                write()

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            write()
