"""Bearer keys: the API key guards the API, the admin key (else the API key) guards /admin.

Everything is guarded except the operational endpoints that probes and scrapers call
without credentials (``/health``, ``/ready``, ``/metrics``, ``/openapi.json``). Keys are
compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from flowserve_openai.errors import APIError

if TYPE_CHECKING:
    from starlette.types import ASGIApp

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json"})


class BearerKeyMiddleware:
    """Pure ASGI middleware (it must not buffer streamed responses) answering 401 in
    OpenAI's shape when a guarded path lacks the right ``Authorization: Bearer`` key."""

    def __init__(self, app: ASGIApp, api_key: str | None, admin_key: str | None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        admin = admin_key or api_key
        self.admin_key = admin.encode() if admin else None

    def required_key(self, path: str) -> bytes | None:
        """The key ``path`` needs, or None when it is open."""
        if path in OPEN_PATHS:
            return None
        if path == "/admin" or path.startswith("/admin/"):
            return self.admin_key
        return self.api_key

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") != "OPTIONS":
            key = self.required_key(scope["path"])
            if key is not None:
                given = _bearer(scope)
                if given is None or not hmac.compare_digest(given, key):
                    await _unauthorized(send, "missing" if given is None else "wrong")
                    return
        await self.app(scope, receive, send)


def _bearer(scope: Any) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


async def _unauthorized(send: Any, why: str) -> None:
    message = ("You didn't provide an API key. Send it as 'Authorization: Bearer KEY'." if why == "missing"
               else "Incorrect API key provided.")
    body = APIError(401, message, code="invalid_api_key").encode()
    await send({"type": "http.response.start", "status": 401, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b"Bearer")]})
    await send({"type": "http.response.body", "body": body})
