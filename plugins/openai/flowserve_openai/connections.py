"""Deadlines and a cap for the server's HTTP connections (issue 20: 32 slowloris connections,
one header byte a second, were all still open after 40 s).

uvicorn closes a keep-alive connection that stays idle after a response
(``timeout_keep_alive``), but sets no deadline on a request's headers: a client that connects
and sends nothing, or one byte a second, holds its connection forever. ``guarded_protocol``
returns uvicorn's own HTTP protocol (httptools) with two additions:

* a request's headers must be complete within ``header_timeout`` seconds of the connection
  opening or of the request's first byte; otherwise the server answers 408 and closes;
* past ``max_connections`` open connections, a new one is answered 503 (OpenAI's error shape,
  ``Retry-After: 1``) and closed, instead of waiting for file descriptors to run out.

The idle time between requests on a kept-alive connection stays uvicorn's ``timeout_keep_alive``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from flowserve_openai.protocol import ErrorDetail, ErrorResponse, encoder

log = logging.getLogger(__name__)

_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def _over_capacity(limit: int) -> bytes:
    body = encoder.encode(ErrorResponse(error=ErrorDetail(
        message=f"The server holds its maximum of {limit} open connections; retry shortly.",
        type="server_error", code="too_many_connections")))
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline and a connection cap (class
    attributes set by ``guarded_protocol``)."""

    header_timeout: float = 10.0
    max_connections: int = 1024
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn's narrows it too
        """Count the connection; refuse it past the cap; start its first header deadline."""
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.debug("refused a connection: %d open", len(self.connections) - 1)
            transport.write(_over_capacity(self.max_connections))
            transport.close()
            return
        self._arm_header_deadline()

    def on_message_begin(self) -> None:
        """A request's first byte: its headers are due within ``header_timeout``."""
        super().on_message_begin()
        self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        """Headers in time: the request runs; its body and response have no deadline here."""
        self._cancel_header_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the deadline of a connection that is gone."""
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self.header_timeout > 0 and self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            log.debug("closed a connection whose request headers took over %s s", self.header_timeout,
                      extra={"client": self.client})
            self.transport.write(_TIMED_OUT)
            self.transport.close()


def guarded_protocol(header_timeout: float, max_connections: int) -> type[Any]:
    """The protocol class to give ``uvicorn.Config(http=…)`` for these limits (0: no header
    deadline)."""
    return type("GuardedProtocol", (GuardedProtocol,),
                {"header_timeout": header_timeout, "max_connections": max_connections})
