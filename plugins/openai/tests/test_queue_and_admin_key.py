"""A full queue is a 429 with Retry-After; a separate admin key guards /admin only."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai_live import MODEL, serve_command, write_config

ADMIN_KEY = "adm-flowserve-test"


@pytest.fixture(scope="module")
def queue_server(start_server, tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("queue"), f'admin_key = "{ADMIN_KEY}"\n')
    return start_server(serve_command("--config", config, "--max-queue", "1", "-o", "step_delay=0.2"))


def test_a_full_queue_is_a_429_with_retry_after(queue_server):
    body = {"model": MODEL, "prompt": "t1", "max_tokens": 50, "stream": True}
    with httpx.stream("POST", queue_server.base_url + "/completions", json=body, timeout=30) as holder:
        assert holder.status_code == 200  # admitted: it fills the queue of one
        refused = httpx.post(queue_server.base_url + "/completions", timeout=30,
                             json={"model": MODEL, "prompt": "t1", "max_tokens": 2})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert "queue" in error["message"] and "full" in error["message"]
        with pytest.raises(openai.RateLimitError):
            queue_server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "t1"}])
        with pytest.raises(openai.RateLimitError):  # streaming requests are refused before the stream starts
            queue_server.client().completions.create(model=MODEL, prompt="t1", stream=True)
    assert queue_server.wait_metric("flowserve:num_requests_running", lambda v: v == 0) == 0


def test_n_beyond_the_queue_is_refused_whole(queue_server):
    refused = httpx.post(queue_server.base_url + "/completions", timeout=30,
                         json={"model": MODEL, "prompt": "t1", "max_tokens": 2, "n": 2})
    assert refused.status_code == 429
    assert queue_server.wait_metric("flowserve:num_requests_running", lambda v: v == 0) == 0
    assert queue_server.metric("flowserve:num_requests_waiting") == 0


def test_the_admin_key_guards_admin_and_not_the_api(queue_server):
    status = queue_server.url + "/admin/status"
    assert httpx.get(status, timeout=10).status_code == 401
    assert httpx.get(status, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    answer = httpx.get(status, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert answer.status_code == 200 and answer.json()["deployment"] == MODEL
    # no API key configured: the API is open
    assert httpx.get(queue_server.base_url + "/models", timeout=10).status_code == 200
