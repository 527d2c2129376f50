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
    "flowserve:request_time_per_output_token_seconds", "flowserve:request_inference_time_seconds",
    "flowserve:request_prefill_time_seconds", "flowserve:request_decode_time_seconds",
    "flowserve:request_prompt_tokens", "flowserve:request_generation_tokens", "flowserve:request_params_max_tokens",
    "flowserve:num_preemptions", "flowserve:num_instances_by_start_path", "flowserve:scale_events",
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


def test_metrics_have_vllm_names_and_label_names_under_our_prefix(toy_server):
    toy_server.client().completions.create(model=MODEL, prompt="t3", max_tokens=3)
    response = httpx.get(toy_server.url + "/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    for name in METRIC_NAMES:
        assert f"# TYPE {name}" in response.text, name
    samples = toy_server.metrics()
    model = (("model_name", MODEL),)
    assert samples[("flowserve:time_to_first_token_seconds_count", model)] >= 1
    assert samples[("flowserve:request_success_total", (("finished_reason", "length"), *model))] >= 1
    assert samples[("flowserve:num_instances", (*model, ("state", "ready")))] == 1
    assert samples[("flowserve:generation_tokens_total", model)] >= 3
    assert samples[("flowserve:prompt_tokens_total", model)] >= 1
    # a finished request of 3 tokens (max_tokens 3): the per-request histograms saw it
    for name in ("request_generation_tokens", "request_prompt_tokens", "request_params_max_tokens",
                 "request_inference_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
                 "request_time_per_output_token_seconds"):
        assert samples[(f"flowserve:{name}_count", model)] >= 1, name
    generated = samples[("flowserve:request_generation_tokens_count", model)]
    assert samples[("flowserve:request_generation_tokens_bucket", (("le", "2.0"), *model))] < generated
    assert samples[("flowserve:request_params_max_tokens_bucket", (("le", "5.0"), *model))] >= 1
    # every instance started and not ended is in the pool, by its start path
    up = samples[("flowserve:scale_events_total", (("direction", "up"), *model))]
    down = samples[("flowserve:scale_events_total", (("direction", "down"), *model))]
    live = sum(v for (name, _), v in samples.items() if name == "flowserve:num_instances_by_start_path")
    assert up >= 1 and up - down == live >= 1
    assert samples[("flowserve:num_preemptions_total", model)] == 0


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
    for path, request, response in (("/v1/responses", "ResponseRequest", "ResponseObject"),
                                    ("/tokenize", "TokenizeRequest", "TokenizeResponse"),
                                    ("/detokenize", "DetokenizeRequest", "DetokenizeResponse")):
        operation = document["paths"][path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + request)
        assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + response)
        assert {"400", "404"} <= set(operation["responses"]) and request in schemas and response in schemas
    assert "text/event-stream" in document["paths"]["/v1/responses"]["post"]["responses"]["200"]["content"]
    assert {"input", "instructions", "max_output_tokens", "text", "tools"} <= set(schemas["ResponseRequest"]["properties"])
    assert {"prompt", "messages", "return_token_strs"} <= set(schemas["TokenizeRequest"]["properties"])


def test_cors_is_off_unless_configured(toy_server):
    preflight = httpx.options(toy_server.base_url + "/chat/completions", timeout=10, headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
