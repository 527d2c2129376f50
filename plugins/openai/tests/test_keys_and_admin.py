"""API keys, the admin endpoints and their commands, CORS and aliases, on a keyed server."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
from openai_live import MODEL, serve_command, write_config

API_KEY = "sk-flowserve-test-key"
ALIAS = "gpt-4o-mini"
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def keyed_server(start_server, tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("keyed"), f"""
cors_origins = ["{ORIGIN}"]
max_n = 4

[aliases]
"{ALIAS}" = "{MODEL}"
""")
    return start_server(serve_command("--config", config, "--max-instances", "2"),
                        env={"FLOWSERVE_API_KEY": API_KEY})


def flowserve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowserve_core.cli", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "COLUMNS": "200", "TERM": "dumb", **(env or {})})


def test_missing_or_wrong_keys_are_401s_in_openai_shape(keyed_server):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {API_KEY}"}):
        response = httpx.get(keyed_server.base_url + "/models", headers=headers, timeout=10)
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
        assert API_KEY not in response.text
    with pytest.raises(openai.AuthenticationError):
        keyed_server.client(api_key="wrong").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "t1"}])
    assert API_KEY not in keyed_server.log()


def test_the_right_key_works_and_probes_stay_open(keyed_server):
    client = keyed_server.client(api_key=API_KEY)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "t1"}], max_tokens=2)
    assert chat.usage.completion_tokens == 2
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        assert httpx.get(keyed_server.url + path, timeout=10).status_code == 200, path
    document = httpx.get(keyed_server.url + "/openapi.json", timeout=10).json()
    assert document["paths"]["/v1/completions"]["post"]["security"] == [{"bearer": []}]
    assert document["components"]["schemas"]["ChatCompletionRequest"]["properties"]["n"]["maximum"] == 4


def test_aliases_are_listed_and_served(keyed_server):
    client = keyed_server.client(api_key=API_KEY)
    cards = {card.id: card for card in client.models.list().data}
    assert set(cards) == {MODEL, ALIAS} and cards[ALIAS].root == MODEL
    completion = client.completions.create(model=ALIAS, prompt="t5", max_tokens=2)
    assert completion.model == ALIAS and completion.usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError, match="at most 4"):
        client.completions.create(model=ALIAS, prompt="t5", max_tokens=2, n=5)


def test_cors_allows_the_configured_origin_only(keyed_server):
    asked = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(keyed_server.base_url + "/chat/completions", timeout=10,
                            headers={"Origin": ORIGIN, **asked})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(keyed_server.base_url + "/chat/completions", timeout=10,
                          headers={"Origin": "https://evil.example", **asked})
    assert "access-control-allow-origin" not in other.headers


def test_admin_endpoints_need_the_key_and_scale_the_deployment(keyed_server):
    admin = keyed_server.url + "/admin"
    assert httpx.get(admin + "/status", timeout=10).status_code == 401
    assert httpx.post(admin + "/scale", json={"instances": 2}, timeout=10).status_code == 401
    auth = {"Authorization": f"Bearer {API_KEY}"}  # no admin_key configured: the API key is the admin key
    status = httpx.get(admin + "/status", headers=auth, timeout=10).json()
    assert status["deployment"] == MODEL and status["target"] == 1 and len(status["instances"]) == 1
    instance = status["instances"][0]
    assert set(instance) >= {"id", "role", "state", "start_path", "start_seconds", "pid"}
    assert (instance["role"], instance["state"], instance["start_path"]) == ("colocated", "ready", "in-process")
    too_many = httpx.post(admin + "/scale", json={"instances": 3}, headers=auth, timeout=10)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "instances"
    unknown = httpx.get(admin + "/status", params={"deployment": "nope"}, headers=auth, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "deployment"


def test_scale_and_status_commands(keyed_server):
    result = flowserve("scale", "2", "--url", keyed_server.url, "--admin-key", API_KEY)
    assert result.returncode == 0, result.stderr
    assert f"{MODEL}: target 2" in result.stdout
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = flowserve("status", "--url", keyed_server.url, "--deployment", MODEL,
                           env={"FLOWSERVE_API_KEY": API_KEY})
        assert status.returncode == 0, status.stderr
        if status.stdout.count("ready") == 2:
            break
        time.sleep(0.2)
    assert "2 instance(s), target 2" in status.stdout and status.stdout.count("colocated") == 2
    assert keyed_server.metric("flowserve:num_instances", state="ready") == 2
    refused = flowserve("scale", "5", "--url", keyed_server.url, "--admin-key", API_KEY)
    assert refused.returncode == 1 and "max_instances" in refused.stderr
    unauthorized = flowserve("status", "--url", keyed_server.url, "--admin-key", "wrong")
    assert unauthorized.returncode == 1 and "401" in unauthorized.stderr
    assert flowserve("scale", "1", "--url", keyed_server.url, "--admin-key", API_KEY).returncode == 0
    assert keyed_server.wait_metric("flowserve:num_instances", lambda v: v == 1, state="ready") == 1
