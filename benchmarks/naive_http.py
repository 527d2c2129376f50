"""The HTTP side of the naive baseline server (``naive_server.py``): the request and response
bodies it accepts and sends, its OpenAI-shaped error, and the ASGI response that streams one
generation (SSE) or answers it whole, stopping the generation when the client disconnects."""

from __future__ import annotations

import math
import threading
import time
import uuid
from typing import Any, Literal

import anyio
import msgspec

# ------------------------------------------------------------------ request and response bodies


class StreamOptions(msgspec.Struct):
    """``stream_options``: only ``include_usage`` is honoured."""

    include_usage: bool = False


class ChatMessage(msgspec.Struct):
    """One chat message (text content only)."""

    role: str
    content: str


class _GenerationParams(msgspec.Struct, kw_only=True):
    """The fields both endpoints share (unknown fields are ignored)."""

    model: str
    min_tokens: int = 0
    ignore_eos: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionBody(_GenerationParams, kw_only=True):
    """``POST /v1/completions``; ``prompt`` is a string or a list of token ids (one prompt)."""

    prompt: str | list[Any]
    max_tokens: int = 16


class ChatBody(_GenerationParams, kw_only=True):
    """``POST /v1/chat/completions`` (text messages)."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class Usage(msgspec.Struct):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "code"}}``."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class GenerationJob(msgspec.Struct, kw_only=True):
    """A validated request, ready for ``NaiveModel.generate``."""

    kind: Literal["completion", "chat"]
    prompt_ids: list[int]
    max_tokens: int
    min_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    include_usage: bool


# ------------------------------------------------------------------ the response


class Detokenizer:
    """Turns a growing list of token ids into text deltas, holding back an incomplete UTF-8
    character (decoded as U+FFFD) until the token that completes it arrives."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, ids: list[int]) -> str:
        """Append ``ids``; return the new text that is safe to send."""
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        # Decoding more tokens may in rare cases rewrite earlier text (cleanup of spaces);
        # what was sent stays sent, so only the new tail goes out.
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta

    def flush(self) -> str:
        """The text still held back at the end (an incomplete character stays U+FFFD)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta


class GenerationResponse:
    """The ASGI response of one generation request. It owns the request's whole life in one
    task group: a watcher that stops generation when the client disconnects, the generation
    task (behind the global lock, in a worker thread), and the writer of SSE or JSON."""

    def __init__(self, server: Any, job: GenerationJob) -> None:
        self.server = server
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        server, job = self.server, self.job
        rid = f"{'chatcmpl' if job.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        stop = threading.Event()
        outcome: dict[str, str] = {}
        detok = Detokenizer(server.model.tokenizer)
        token_send, token_receive = anyio.create_memory_object_stream[list[int]](math.inf)
        async with anyio.create_task_group() as tg:
            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                stop.set()
                tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            tg.start_soon(server.generate, job, token_send, stop, outcome)
            try:
                if job.stream:
                    await send({"type": "http.response.start", "status": 200, "headers": [
                        (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
                    if job.kind == "chat":  # as OpenAI does: the role first, with empty content
                        body = server.chunk(job, rid, created, None, None, first=True)
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                    async with token_receive:
                        async for ids in token_receive:
                            text = detok.add(ids)
                            if text:
                                body = server.chunk(job, rid, created, text, None)
                                await send({"type": "http.response.body", "body": body, "more_body": True})
                    if "error" in outcome:
                        error = {"error": {"message": outcome["error"], "type": "InternalServerError", "code": 500}}
                        await send({"type": "http.response.body", "more_body": False,
                                    "body": b"data: " + server.encoder.encode(error) + b"\n\ndata: [DONE]\n\n"})
                        return
                    finish = outcome.get("finish_reason", "stop")
                    tail = server.chunk(job, rid, created, detok.flush() or None, finish)
                    if job.include_usage:
                        tail += server.usage_chunk(job, rid, created, self._usage(detok))
                    await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n",
                                "more_body": False})
                else:
                    async with token_receive:
                        async for ids in token_receive:
                            detok.add(ids)
                    status = 200
                    if "error" in outcome:
                        status, body = 500, server.encoder.encode({"error": {
                            "message": outcome["error"], "type": "InternalServerError", "code": 500}})
                    else:
                        detok.flush()
                        body = server.full_response(job, rid, created, detok.emitted,
                                                    outcome.get("finish_reason", "stop"),
                                                    self._usage(detok))
                    await send({"type": "http.response.start", "status": status,
                                "headers": [(b"content-type", b"application/json")]})
                    await send({"type": "http.response.body", "body": body, "more_body": False})
            finally:
                stop.set()  # a failed send (client gone) must also end generation
                tg.cancel_scope.cancel()  # the disconnect watcher

    def _usage(self, detok: Detokenizer) -> Usage:
        prompt = len(self.job.prompt_ids)
        return Usage(prompt_tokens=prompt, completion_tokens=len(detok.ids), total_tokens=prompt + len(detok.ids))
