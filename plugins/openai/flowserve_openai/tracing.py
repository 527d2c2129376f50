"""Trace context of incoming calls: the caller's W3C ``traceparent`` becomes the parent of the
request spans the kernel opens (``flowserve_core.telemetry``), and the endpoint names their
GenAI operation (``chat``, ``text_completion``).

Pure ASGI, so streamed responses are not buffered; while tracing is off it only passes calls
on. The context stays attached for the whole call, streaming included: the choices' tasks
start inside it and inherit it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flowserve_core import telemetry

if TYPE_CHECKING:
    from starlette.types import ASGIApp

#: the GenAI operation of each generating endpoint (the conventions' well-known names)
OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion"}


class TraceContextMiddleware:
    """Wraps the generating endpoints in ``telemetry.incoming_call``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        operation = OPERATIONS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if operation is None or not telemetry.tracer_enabled():
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope.get("headers", [])}
        with telemetry.incoming_call(headers, operation):
            await self.app(scope, receive, send)
