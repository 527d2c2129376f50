"""ASGI responses: msgspec-encoded JSON, OpenAI-shaped errors, and the generation response
that streams (or collects) a call's output while watching for the client to go away."""

from __future__ import annotations

from typing import Any

import anyio
from starlette.responses import Response

from flowserve_openai.errors import APIError
from flowserve_openai.generation import Generation
from flowserve_openai.protocol import encoder
from flowserve_openai.rendering import DONE, sse

JSON = "application/json"
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``body`` (a Struct, or bytes already encoded) as an ``application/json`` response."""
    content = body if isinstance(body, bytes) else encoder.encode(body)
    return Response(content, status_code=status, headers=headers, media_type=JSON)


def error_response(error: APIError) -> Response:
    """The OpenAI error body of ``error``, with its status and headers (e.g. Retry-After)."""
    return json_response(error.encode(), error.status, error.headers)


class GenerationResponse:
    """Runs a ``Generation`` while answering: SSE chunks as they come (``stream``), or one
    JSON body at the end. A client that disconnects cancels the generation, which aborts its
    requests on the engine (the response task is cancelled; each request's ``async with``
    exits)."""

    def __init__(self, generation: Generation, renderer: Any, stream: bool):
        self.generation = generation
        self.renderer = renderer
        self.stream = stream
        self._stream_open = False  # the SSE response started and has not sent [DONE] yet

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
                await self._respond(send)
                tg.cancel_scope.cancel()
        except anyio.get_cancelled_exc_class():
            # Cancelled from outside (a client's disconnect cancels only the group above): the
            # server's drain timeout ran out. An open stream ends with an error event, not a cut.
            if self._stream_open:
                error = APIError(503, "The server shut down before this request finished (its drain_timeout "
                                      "ran out); retry it.", code="shutting_down")
                with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                    await send({"type": "http.response.body", "body": sse(error.encode()), "more_body": True})
                    await send({"type": "http.response.body", "body": DONE, "more_body": False})
            raise

    async def _respond(self, send: Any) -> None:
        renderer, streaming = self.renderer, False

        async def body(data: bytes, more: bool = True) -> None:
            self._stream_open = streaming and more
            await send({"type": "http.response.body", "body": data, "more_body": more})

        async def on_started() -> None:
            nonlocal streaming
            if self.stream:
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                streaming = self._stream_open = True
                for chunk in renderer.opening():
                    await body(chunk)

        async def on_event(event: Any) -> None:
            if streaming:
                for chunk in renderer.chunks(event):
                    await body(chunk)
            else:
                renderer.add(event)

        failure = await self.generation.run(on_started, on_event)
        if streaming:
            chunks = [sse(failure.encode())] if failure else renderer.closing()
            for chunk in chunks:
                await body(chunk)
            await body(DONE, more=False)
            return
        status, headers, content = 200, {}, b""
        if failure is not None:
            status, headers, content = failure.status, failure.headers, failure.encode()
        else:
            content = renderer.body()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", JSON.encode()), (b"content-length", str(len(content)).encode()),
            *((k.lower().encode(), v.encode()) for k, v in headers.items())]})
        await body(content, more=False)


async def _cancel_on_disconnect(receive: Any, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
