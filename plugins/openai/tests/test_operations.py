"""/v1/models, /health, /ready, /metrics and /openapi.json on the shared server."""

from __future__ import annotations

import httpx
from openai_live import MODEL

METRIC_NAMES = [
    "flowserve:time_to_first_token_seconds", "flowserve:inter_token_latency_seconds",
    "flowserve:e2e_request_latency_seconds", "flowserve:request_queue_time_seconds",
    "flowserve:num_requests_running", "flowserve:num_requests_waiting", "flowserve:kv_cache_usage_perc",
    "flowserve:prefix_cache_hits", "flowserve:prefix_cache_queries", "flowserve:prompt_tokens",
    "flowserve:generation_tokens", "flowserve:request_success", "flowserve:num_instances",
]


def test_models_list_and_retrieve(toy_server):
    client = toy_server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = models.data[0]
    assert card.object == "model" and card.owned_by == "flowserve" and isinstance(card.created, int)
    assert client.models.retrieve(MODEL).id == MODEL


def test_health_and_ready(toy_server):
    health = httpx.get(toy_server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    ready = httpx.get(toy_server.url + "/ready", timeout=10)
    assert ready.status_code == 200
    toy = ready.json()["deployments"][MODEL]
    assert toy["state"] == "ready" and toy["instances"]["ready"] == 1


def test_metrics_have_vllm_names_under_our_prefix_with_a_model_label(toy_server):
    toy_server.client().completions.create(model=MODEL, prompt="t3", max_tokens=3)
    response = httpx.get(toy_server.url + "/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    for name in METRIC_NAMES:
        assert f"# TYPE {name}" in response.text, name
    samples = toy_server.metrics()
    assert samples[("flowserve:time_to_first_token_seconds_count", (("model", MODEL),))] >= 1
    assert samples[("flowserve:request_success_total", (("finish_reason", "length"), ("model", MODEL)))] >= 1
    assert samples[("flowserve:num_instances", (("model", MODEL), ("state", "ready")))] == 1
    assert samples[("flowserve:generation_tokens_total", (("model", MODEL),))] >= 3
    assert samples[("flowserve:prompt_tokens_total", (("model", MODEL),))] >= 1


def test_openapi_describes_the_endpoints_and_bodies(toy_server):
    document = httpx.get(toy_server.url + "/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.1")
    for path in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/ready", "/metrics",
                 "/admin/scale", "/admin/status"):
        assert path in document["paths"], path
    schemas = document["components"]["schemas"]
    completion = schemas["CompletionRequest"]
    assert "prompt" in completion["required"] and completion["properties"]["n"]["maximum"] == 16
    assert {"top_k", "min_p", "repetition_penalty", "stop_token_ids", "min_tokens"} <= set(completion["properties"])
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert {"200", "400", "404", "413", "429", "503"} <= set(chat["responses"])
    assert "security" not in chat  # this server has no API key


def test_cors_is_off_unless_configured(toy_server):
    preflight = httpx.options(toy_server.base_url + "/chat/completions", timeout=10, headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
