"""Several deployments from one ``flowserve serve --config`` file, each ``[[deployments]]``
table with its own components, dtype, scaler, bounds and SLOs (toy engine: cheap); and the
admin key guarding the run-time deployment and alias endpoints when keys are on.

(``test_deployments.py`` runs real models — two tiny Llamas and SmolLM2 — through
``--model NAME=PATH``, adds, switches and removes them under load.)"""

from __future__ import annotations

import sys
import time

import httpx
import openai
import pytest
from openai_live import write_config

API_KEY = "sk-many-models-api"
ADMIN_KEY = "sk-many-models-admin"
TOY = 'tokenizer = "whitespace"\nexecutor = "counter"\nkv_cache = "unbounded"\nbatch_scheduler = "fifo"\n'


@pytest.fixture(scope="module")
def configured_server(start_server, tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("many"), f"""
api_key = "{API_KEY}"
admin_key = "{ADMIN_KEY}"

[[deployments]]
name = "alpha"
model = "toy-alpha"
{TOY}job_scheduler = "least-tasks"
scaler = "inproc"
dtype = "float32"
min_instances = 2
max_instances = 3
slo_ttft_seconds = 2.5

[[deployments]]
name = "beta"
model = "toy-beta"
{TOY}job_scheduler = "colocated"
scaler = "static"
dtype = "bfloat16"
min_instances = 1
max_instances = 2
slo_ttft_seconds = 4.0
slo_tpot_seconds = 0.5
scale_to_zero_after = 600

[aliases]
chat = "alpha"
""")
    command = [sys.executable, "-m", "flowserve_core.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--config", config]
    return start_server(command)


def call(server, method: str, path: str, key: str | None = ADMIN_KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.url + path, headers=headers, timeout=60, **kw)


def test_each_deployments_table_is_served_with_its_own_settings(configured_server):
    server = configured_server
    deadline = time.monotonic() + 120
    while True:  # the server is ready once one instance of each is; wait for alpha's second
        listing = call(server, "GET", "/admin/deployments").json()
        if listing["deployments"][0]["instances"].get("ready") == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    by_name = {d["name"]: d for d in listing["deployments"]}
    assert list(by_name) == ["alpha", "beta"]
    picked = ("model", "dtype", "job_scheduler", "scaler", "min_instances", "max_instances", "target",
              "slo_ttft_seconds", "slo_tpot_seconds", "scale_to_zero_after")
    assert {k: by_name["alpha"][k] for k in picked} == {
        "model": "toy-alpha", "dtype": "float32", "job_scheduler": "least-tasks", "scaler": "inproc",
        "min_instances": 2, "max_instances": 3, "target": 2, "slo_ttft_seconds": 2.5,
        "slo_tpot_seconds": None, "scale_to_zero_after": None}
    assert {k: by_name["beta"][k] for k in picked} == {
        "model": "toy-beta", "dtype": "bfloat16", "job_scheduler": "colocated", "scaler": "static",
        "min_instances": 1, "max_instances": 2, "target": 1, "slo_ttft_seconds": 4.0,
        "slo_tpot_seconds": 0.5, "scale_to_zero_after": 600.0}
    assert by_name["alpha"]["instances"]["ready"] == 2 and by_name["beta"]["instances"]["ready"] == 1
    assert listing["aliases"] == {"chat": "alpha"} and by_name["alpha"]["aliases"] == ["chat"]
    # beta's instance is its own process (scaler static); alpha's live in the server (inproc)
    (beta_instance,) = call(server, "GET", "/admin/status", params={"deployment": "beta"}).json()["instances"]
    assert beta_instance["pid"] and beta_instance["pid"] != server.process.pid

    with server.client(API_KEY) as client:
        assert {m.id for m in client.models.list().data} == {"alpha", "beta", "chat"}
        for model, expected in (("alpha", "alpha"), ("beta", "beta"), ("chat", "alpha")):
            before = server.metric("flowserve:request_success_total", model_name=expected, finished_reason="length")
            answer = client.completions.create(model=model, prompt="t5 t6", max_tokens=3)
            assert answer.model == model and answer.choices[0].text.split() == ["t7", "t8", "t9"]
            after = server.metric("flowserve:request_success_total", model_name=expected, finished_reason="length")
            assert after == before + 1, (model, expected, before, after)  # it ran on that deployment
        with pytest.raises(openai.NotFoundError, match="this server serves: alpha, beta, chat"):
            client.completions.create(model="gamma", prompt="t1", max_tokens=1)


def test_the_admin_key_guards_the_deployment_and_alias_endpoints(configured_server):
    server = configured_server
    calls = (("GET", "/admin/deployments", None), ("POST", "/admin/deployments", {"name": "x"}),
             ("DELETE", "/admin/deployments/alpha", None), ("POST", "/admin/aliases", {"alias": "c2",
                                                                                   "deployment": "beta"}),
             ("DELETE", "/admin/aliases/chat", None))
    for method, path, body in calls:
        for key in (None, API_KEY, "sk-stranger"):  # the API key is not the admin key
            refused = call(server, method, path, key, json=body)
            assert refused.status_code == 401, (method, path, key, refused.text)
            assert refused.json()["error"]["type"] == "authentication_error"
    # nothing above changed anything
    listing = call(server, "GET", "/admin/deployments").json()
    assert [d["name"] for d in listing["deployments"]] == ["alpha", "beta"] and listing["aliases"] == {"chat": "alpha"}
    # with the admin key each call goes through to the endpoint itself
    incomplete = call(server, "POST", "/admin/deployments", json={"name": "x"})
    assert incomplete.status_code == 400 and incomplete.json()["error"]["param"] == "model"
    assert call(server, "DELETE", "/admin/deployments/nope").status_code == 404
    switched = call(server, "POST", "/admin/aliases", json={"alias": "chat", "deployment": "beta"})
    assert switched.status_code == 200 and switched.json()["previous"] == "alpha"
    with server.client(API_KEY) as client:
        assert client.completions.create(model="chat", prompt="t1", max_tokens=1).model == "chat"
    assert call(server, "DELETE", "/admin/aliases/chat").json()["previous"] == "beta"
    assert "chat" not in call(server, "GET", "/admin/deployments").json()["aliases"]
