"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

A request that fails is returned as a record with its ``error`` set (the HTTP status and the
server's message, or what went wrong before a status came); nothing here raises for a failed
request, and ``timeout`` bounds each request from its sending to its last chunk.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anyio
import msgspec

from flowserve_bench.errors import BenchError
from flowserve_bench.results import BenchConfig, RequestError, RequestRecord


class PlannedRequest(msgspec.Struct):
    """A request decided before the run starts: its prompt (token ids or text; or, for the
    chat endpoint, whole ``messages`` from a dataset) and the lengths asked for
    (``prompt_len`` 0: the server counts it)."""

    index: int
    prompt: list[int] | str
    prompt_len: int
    output_len: int
    messages: list[dict[str, Any]] | None = None


# ---- what the server streams (only the fields we read; the rest is ignored)


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: Any = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)
_encoder = msgspec.json.Encoder()


def api_base(url: str) -> str:
    """The base URL without a trailing slash; a bare ``http://host:port`` gets ``/v1``."""
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise BenchError(f"--url {url!r} is not an http(s) URL like http://127.0.0.1:8000/v1")
    base = url.rstrip("/")
    return base + "/v1" if parsed.path in ("", "/") else base


def build_payload(config: BenchConfig, model: str, planned: PlannedRequest) -> dict[str, Any]:
    """The JSON body: streamed, with usage, greedy by default; ``ignore_eos`` also sends
    ``min_tokens`` equal to ``max_tokens``, so servers without ``ignore_eos`` still comply."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": planned.output_len,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.endpoint == "chat":
        body["messages"] = planned.messages or [{"role": "user", "content": planned.prompt}]
    else:
        body["prompt"] = planned.prompt
    if config.ignore_eos:
        body["ignore_eos"] = True
        body["min_tokens"] = planned.output_len
    return body


def error_message(body: bytes) -> str:
    """The message inside an error body (OpenAI's ``{"error": {"message"}}`` and kin)."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body.decode("utf-8", "replace").strip()[:500] or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or error)[:500]
        return str(error)[:500]
    return str(data)[:500]


def client_session(config: BenchConfig) -> aiohttp.ClientSession:
    """The load generator's HTTP client: aiohttp, as vLLM's ``benchmark_serving`` uses. It needs
    about half of httpx's CPU per request, and a generator short of CPU puts its own lag into
    every latency it measures (docs/bench.md and docs/reliability.md show both). Connections
    are bounded by the concurrency, when there is one."""
    bound = config.concurrency or config.max_concurrency
    if bound is None and config.request_rate is None:
        bound = 1
    headers = {"authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, connect=min(config.timeout, 30.0), sock_read=config.timeout)
    return aiohttp.ClientSession(headers=headers, timeout=timeout,
                                 connector=aiohttp.TCPConnector(limit=bound or 0, limit_per_host=0))


async def send_request(session: aiohttp.ClientSession, url: str, config: BenchConfig, model: str,
                       planned: PlannedRequest, run_start: float) -> RequestRecord:
    """Send ``planned`` to ``url`` (the full endpoint URL), stream the answer, time it."""
    content = _encoder.encode(build_payload(config, model, planned))
    start = time.perf_counter()
    record = RequestRecord(index=planned.index, start=start - run_start,
                           requested_prompt_tokens=planned.prompt_len,
                           requested_output_tokens=planned.output_len)
    if isinstance(planned.prompt, list):
        record.prompt_tokens = len(planned.prompt)
    try:
        with anyio.fail_after(config.timeout):
            async with await _post(session, url, content) as response:
                if response.status != 200:
                    message = error_message(await response.read())
                    record.error = RequestError(str(response.status), message)
                    return record
                await _read_stream(response, record, start)
    except TimeoutError:  # anyio's bound on the whole request, or aiohttp's connect or read timeout
        record.error = RequestError("timeout", f"no complete answer within --timeout {config.timeout:g} s")
    except aiohttp.ClientConnectorError as exc:
        record.error = RequestError("connect", f"cannot connect to {url}: {exc}")
    except (aiohttp.ClientError, ValueError) as exc:  # ValueError: an SSE line past aiohttp's line limit
        record.error = RequestError("protocol", f"{type(exc).__name__} from {url}: {exc}")
    return record


STALE_CONNECTION_RETRIES = 3


async def _post(session: aiohttp.ClientSession, url: str, content: bytes) -> aiohttp.ClientResponse:
    """POST ``content``; again, up to ``STALE_CONNECTION_RETRIES`` times, when the pooled
    connection it went out on turns out closed before any answer. llama.cpp's llama-server
    closes its connection after each streamed answer although it announces keep-alive, and
    aiohttp can hand that connection out again before the close arrives: the request then
    fails to be written ("Can not write request body") or the server disconnects without a
    status. The server never read that request, so sending it again is safe."""
    for _ in range(STALE_CONNECTION_RETRIES):
        try:
            return await session.post(url, data=content, headers={"content-type": "application/json"})
        except aiohttp.ClientConnectorError:
            raise  # could not connect at all: not a stale connection
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            continue
    return await session.post(url, data=content, headers={"content-type": "application/json"})


async def _read_stream(response: aiohttp.ClientResponse, record: RequestRecord, start: float) -> None:
    """Read SSE events until ``[DONE]`` (or the end), filling ``record``'s timings."""
    last_chunk_at: float | None = None
    chunks_with_text = 0
    usage: _Usage | None = None
    async for line in response.content:  # one line at a time, its newline included
        if not line.startswith(b"data:"):
            continue  # blank separators, comments, event names
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        now = time.perf_counter()
        try:
            chunk = _chunk_decoder.decode(data)
        except msgspec.DecodeError as exc:
            snippet = data[:200].decode("utf-8", "replace")
            record.error = RequestError("stream", f"undecodable event {snippet!r}: {exc}")
            return
        if chunk.error is not None:
            message = chunk.error.get("message", chunk.error) if isinstance(chunk.error, dict) else chunk.error
            record.error = RequestError("stream", str(message)[:500])
            return
        usage = chunk.usage or usage
        has_text = False
        for choice in chunk.choices:
            text = choice.text if choice.delta is None else choice.delta.content
            has_text = has_text or bool(text)
            record.finish_reason = choice.finish_reason or record.finish_reason
        if has_text:
            if last_chunk_at is None:
                record.ttft = now - start
            else:
                record.itl.append(now - last_chunk_at)
            last_chunk_at = now
            chunks_with_text += 1
    record.e2e = time.perf_counter() - start
    if usage is not None and usage.prompt_tokens is not None:
        record.prompt_tokens = usage.prompt_tokens
    if usage is not None and usage.completion_tokens is not None:
        record.output_tokens = usage.completion_tokens
    else:
        record.output_tokens = chunks_with_text  # a server without usage: one token per chunk
    if record.ttft is not None and record.output_tokens > 1:
        record.tpot = (record.e2e - record.ttft) / (record.output_tokens - 1)


async def first_model(session: aiohttp.ClientSession, base: str) -> str:
    """The first model id of ``GET {base}/models``; a clear error when there is none."""
    url = f"{base}/models"
    try:
        async with session.get(url) as response:
            status, body = response.status, await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BenchError(f"cannot list the models at {url} ({type(exc).__name__}: {exc}); "
                         "is the server running? (or pass --model)") from None
    if status != 200:
        raise BenchError(f"GET {url} answered {status}: {error_message(body)} (pass --model to skip it)")
    try:
        return str(msgspec.json.decode(body)["data"][0]["id"])
    except (msgspec.DecodeError, KeyError, IndexError, TypeError):
        raise BenchError(f"GET {url} listed no model: {body[:200].decode('utf-8', 'replace')!r} "
                         "(pass --model)") from None
