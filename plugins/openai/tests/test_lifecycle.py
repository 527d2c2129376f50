"""Instances in their own processes (scaler ``static``): aborts across the process boundary,
graceful shutdown on SIGTERM, and /health when the engine cannot start."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

import httpx
import pytest
from openai_live import MODEL, serve_command, sse_events, toy_only


@pytest.fixture(scope="module")
def process_server(start_server):
    return start_server(serve_command("-o", "step_delay=0.02", scaler="static"))


def test_disconnect_aborts_the_task_in_the_instance_process(process_server):
    body = {"model": MODEL, "prompt": "t1", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", process_server.base_url + "/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()  # kept referenced: dropping it would close the connection
        assert next(line for line in lines if line.startswith("data: "))
        assert process_server.wait_metric("flowserve:kv_cache_usage_perc", lambda v: v > 0) > 0
    assert process_server.wait_metric("flowserve:num_requests_running", lambda v: v == 0) == 0
    # the instance process freed the task's blocks and reported it
    assert process_server.wait_metric("flowserve:kv_cache_usage_perc", lambda v: v == 0) == 0
    assert process_server.metric("flowserve:generation_tokens_total") < 200


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(process_server):
    body = {"model": MODEL, "prompt": "t1", "max_tokens": 40, "stream": True}
    with httpx.stream("POST", process_server.base_url + "/completions", json=body, timeout=60) as response:
        chunks = response.iter_bytes()
        first = next(chunks)
        process_server.process.send_signal(signal.SIGTERM)
        raw = (first + b"".join(chunks)).decode()
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert len(payloads) == 40  # every token arrived
    assert process_server.process.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(process_server.url + "/health", timeout=5)


@toy_only
def test_health_is_503_when_the_engine_cannot_start(start_server):
    server = start_server(serve_command("-o", "fail_to_start=true", scaler="static"), ready=False)
    deadline = time.monotonic() + 90
    while (health := httpx.get(server.url + "/health", timeout=10)).status_code == 200:
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.1)
    assert health.status_code == 503
    toy = health.json()["deployments"][MODEL]
    assert toy["state"] == "dead" and "fail_to_start" in toy["error"]
    assert httpx.get(server.url + "/ready", timeout=10).status_code == 503
    refused = httpx.post(server.base_url + "/completions", json={"model": MODEL, "prompt": "t1"}, timeout=10)
    assert refused.status_code == 503
    error = refused.json()["error"]
    assert error["code"] == "engine_dead" and error["type"] == "service_unavailable"
    assert server.stop() == 0


def test_a_busy_port_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        command = [*serve_command(), "--port", port]  # the later --port wins
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "in use" in result.stderr
