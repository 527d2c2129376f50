"""A crash the scaler is replacing is not a dead deployment (issue 20, item 3).

One instance process (scaler ``static``, job scheduler ``colocated``) is SIGKILLed while it
streams; requests sent over the next seconds wait for the replacement instead of getting
``503 engine_dead``, and the stream that was running on the killed instance fails at once
with a clear error.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
from openai_live import MODEL, serve_command, toy_only
from test_faults import BOUND, StreamRecorder, counter_text, wait_ready, wait_replaced


@pytest.fixture(scope="module")
def one_instance(start_server):
    return start_server(serve_command("--min-instances", "1", "--max-instances", "1", "--job-scheduler", "colocated",
                                      "-o", "step_delay=0.02", scaler="static"))


@toy_only
def test_requests_wait_for_the_replacement_of_a_killed_instance(one_instance):
    server = one_instance
    (victim,) = wait_ready(server, 1)
    stream = StreamRecorder(server.url, {"model": MODEL, "prompt": "t10", "max_tokens": 240, "stream": True})
    stream.start()
    assert stream.first_token.wait(BOUND), server.log()[-3000:]
    os.kill(victim, signal.SIGKILL)
    answers: list[tuple[int, str, float]] = []

    def ask(i: int) -> None:
        sent = time.monotonic()
        try:
            answer = httpx.post(server.url + "/v1/completions", timeout=BOUND,
                                json={"model": MODEL, "prompt": f"t{100 + i}", "max_tokens": 3})
            answers.append((answer.status_code, answer.text, time.monotonic() - sent))
        except httpx.HTTPError as exc:
            answers.append((0, repr(exc), time.monotonic() - sent))

    askers = []
    for i in range(20):  # 20 requests over the next 10 s
        askers.append(threading.Thread(target=ask, args=(i,), daemon=True))
        askers[-1].start()
        time.sleep(0.5)
    for asker in askers:
        asker.join(BOUND)
    assert [status for status, _, _ in answers] == [200] * 20, [a for a in answers if a[0] != 200]
    assert all(text.count(" t") == 3 for _, text, _ in answers)
    # the stream on the killed instance failed with the instance's error, not silently
    assert stream.outcome() == "error", stream.outcome()
    assert counter_text(10, 240).startswith(stream.text)
    assert "is gone" in stream.error["message"], stream.error
    wait_replaced(server, victim, 1)
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["deployments"][MODEL]["state"] == "ready", health
