"""Streams under pressure: a client that goes away, and 50 at once."""

from __future__ import annotations

import anyio
import httpx
import pytest
from openai_live import MODEL


def test_a_client_that_disconnects_mid_stream_aborts_its_request(toy_server):
    generated = toy_server.metric("flowserve:generation_tokens_total")
    aborted = toy_server.metric("flowserve:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": "t1", "max_tokens": 240, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", toy_server.base_url + "/completions", json=body) as response:
            lines = response.iter_lines()  # kept referenced: dropping it would close the connection
            received = []
            while len(received) < 3:
                if (line := next(lines)).startswith("data: "):
                    received.append(line)
            assert toy_server.metric("flowserve:num_requests_running") == 1
            assert toy_server.metric("flowserve:kv_cache_usage_perc") > 0
        # leaving the stream closes the connection: the server must abort the request
    assert toy_server.wait_metric("flowserve:num_requests_running", lambda v: v == 0) == 0
    assert toy_server.wait_metric("flowserve:kv_cache_usage_perc", lambda v: v == 0) == 0
    assert toy_server.wait_metric("flowserve:request_success_total", lambda v: v == aborted + 1,
                                  finished_reason="abort") == aborted + 1
    # it was stopped, not run to its 240 tokens
    assert toy_server.metric("flowserve:generation_tokens_total") - generated < 240


@pytest.mark.anyio
async def test_fifty_concurrent_streams_match_their_solo_runs(toy_server):
    async with toy_server.async_client() as client:
        prompts = [f"t{10 * i + 1} t{10 * i + 2}" for i in range(10)]

        async def stream_text(prompt: str) -> str:
            stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                                     stream=True)
            return "".join([chunk.choices[0].text async for chunk in stream])

        solo = {prompt: await stream_text(prompt) for prompt in prompts}
        results: dict[int, str] = {}

        async def one(i: int) -> None:
            results[i] = await stream_text(prompts[i % len(prompts)])

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(one, i)
        assert len(results) == 50
        assert all(results[i] == solo[prompts[i % len(prompts)]] for i in range(50))
        assert all(len(text) > 0 for text in solo.values())
        assert toy_server.wait_metric("flowserve:num_requests_running", lambda v: v == 0) == 0


def test_a_client_that_gives_up_on_a_non_streamed_request_aborts_it(toy_server):
    aborted = toy_server.metric("flowserve:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": "t1", "max_tokens": 240}
    with pytest.raises(httpx.ReadTimeout):  # the client closes the connection when it gives up
        httpx.post(toy_server.base_url + "/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    assert toy_server.wait_metric("flowserve:request_success_total", lambda v: v == aborted + 1,
                                  finished_reason="abort") == aborted + 1
    assert toy_server.wait_metric("flowserve:num_requests_running", lambda v: v == 0) == 0
