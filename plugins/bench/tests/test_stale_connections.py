"""A server that announces keep-alive but closes the connection after each streamed answer,
as llama.cpp's ``llama-server`` does: every request must still be sent exactly once and
answered, none counted as failed for the client reusing a connection the server dropped."""

from __future__ import annotations

import re

import anyio
import pytest
from anyio.abc import SocketStream

from flowserve_bench.results import BenchConfig
from flowserve_bench.runner import run_benchmark

SSE_EVENTS = [b'data: {"choices": [{"index": 0, "text": "a"}]}\n\n',
              b'data: {"choices": [{"index": 0, "text": "b", "finish_reason": "length"}]}\n\n',
              b'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}\n\n',
              b"data: [DONE]\n\n"]


class ClosingServer:
    """HTTP/1.1 by hand: answers GET with JSON on a kept connection, POST with a chunked SSE
    stream, after which it stops reading and closes the connection a moment later."""

    def __init__(self) -> None:
        self.posts: list[bytes] = []

    async def handle(self, stream: SocketStream) -> None:
        async with stream:
            buffer = b""
            while True:
                try:
                    while b"\r\n\r\n" not in buffer:
                        buffer += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
                while length and len(buffer) < int(length[1]):
                    buffer += await stream.receive()
                body, buffer = (buffer[:int(length[1])], buffer[int(length[1]):]) if length else (b"", buffer)
                if head.startswith(b"GET"):
                    answer = b'{"object": "list", "data": [{"id": "toy", "object": "model"}]}'
                    await stream.send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                      b"content-length: %d\r\nkeep-alive: timeout=5, max=100\r\n\r\n" % len(answer)
                                      + answer)
                    continue
                self.posts.append(body)
                await stream.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                  b"transfer-encoding: chunked\r\nkeep-alive: timeout=5, max=100\r\n\r\n")
                for event in SSE_EVENTS:
                    await stream.send(b"%x\r\n%s\r\n" % (len(event), event))
                await stream.send(b"0\r\n\r\n")
                # The client sees a finished answer on a connection that looks alive, and may
                # send its next request on it before the close arrives; that one is never read.
                await anyio.sleep(0.05)
                return


@pytest.mark.anyio
async def test_requests_on_a_connection_the_server_closed_are_sent_again_once():
    server = ClosingServer()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, server.handle)
        config = BenchConfig(url=f"http://127.0.0.1:{port}/v1", concurrency=2, num_requests=8, warmup=2,
                             prompt_len="4", output_len="2")
        with anyio.fail_after(60):
            result = await run_benchmark(config)
        tg.cancel_scope.cancel()
    assert [e.status for e in result.errors] == [] and result.completed == 8
    assert {r.output_tokens for r in result.requests} == {2}
    assert len(server.posts) == 8 + 2  # each measured and warm-up request reached the server exactly once
