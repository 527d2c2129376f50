"""The OpenAPI 3.1 document served at ``/openapi.json``, generated from the msgspec Structs
the server decodes and encodes, so that it describes exactly what the server does."""

from __future__ import annotations

from typing import Any

import msgspec

from flowserve_core import __version__
from flowserve_core.config import ServerConfig
from flowserve_core.types import DeploymentSpec
from flowserve_openai import (
    embeddings_protocol as ep,
    ops_protocol as ops,
    protocol as p,
    responses_protocol as rp,
    tokenize_protocol as tk,
)
from flowserve_openai.auth import OPEN_PATHS

REF = "#/components/schemas/{name}"
SCHEMAS = [p.CompletionRequest, p.Completion, p.ChatCompletionRequest, p.ChatCompletion, p.ChatCompletionChunk,
           p.ModelList, p.ModelCard, p.ErrorResponse, ops.HealthResponse, ops.ScaleRequest, ops.ScaleResponse,
           ops.StatusResponse, DeploymentSpec, ops.DeploymentStatus, ops.DeploymentList, ops.RemovedDeployment,
           ops.AliasRequest, ops.AliasResponse, rp.ResponseRequest, rp.ResponseObject, tk.TokenizeRequest,
           tk.TokenizeResponse, tk.DetokenizeRequest, tk.DetokenizeResponse, ep.EmbeddingRequest, ep.EmbeddingResponse]


def _ref(struct: type) -> dict[str, str]:
    return {"$ref": REF.format(name=struct.__name__)}


def _json(struct: type, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(struct)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {400: "Invalid request: malformed JSON, a bad parameter (named in error.param), or a "
                    "prompt that does not fit the context.",
               401: "Missing or wrong API key.", 404: "Unknown model or deployment.",
               409: "The name is taken (a deployment or an alias).",
               413: "The body is larger than the server's limit.",
               429: "The deployment's queue is full; retry after Retry-After seconds.",
               500: "The engine failed while running the request.",
               503: "The model is starting, or its engine is down."}
    out = {}
    for status in statuses:
        out[str(status)] = _json(p.ErrorResponse, reasons[status])
        if status == 429:
            out["429"]["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                                     "description": "Seconds to wait before retrying."}}
    return out


def _event_schema(chunk: type) -> dict[str, Any]:
    """One Server-Sent Event: ``data`` is a chunk's JSON, an error's JSON, or ``[DONE]``."""
    return {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"},
        "data": {"description": f"A `{chunk.__name__}` or an `ErrorResponse` as JSON, or `[DONE]` (the last event).",
                 "anyOf": [{"const": "[DONE]"},
                           {"type": "string", "contentMediaType": "application/json",
                            "contentSchema": {"anyOf": [_ref(chunk), _ref(p.ErrorResponse)]}}]}}}


def _generation(request: type, response: type, chunk: type, summary: str) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {
            "200": {"description": "The result; with `stream: true`, Server-Sent Events of "
                                   f"`{chunk.__name__}` objects ending with `data: [DONE]`.",
                    "content": {"application/json": {"schema": _ref(response)},
                                "text/event-stream": {"schema": _event_schema(chunk)}}},
            **_errors(400, 401, 404, 413, 429, 500, 503)},
    }}


def _post(request: type, response: type, summary: str, statuses: tuple[int, ...]) -> dict[str, Any]:
    return {"post": {"summary": summary,
                     "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
                     "responses": {"200": _json(response, "The result."), **_errors(*statuses)}}}


def _responses() -> dict[str, Any]:
    """``/v1/responses``: a ``response`` object, or the Responses API's typed events (each
    event's ``event:`` line is its ``type``; ``response.completed`` or ``response.incomplete``
    carries the final ``response``). No ``[DONE]``."""
    event = {"type": "object", "required": ["event", "data"], "properties": {
        "event": {"type": "string", "description": "The event's type, e.g. `response.output_text.delta`."},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
            {"type": "object", "required": ["type", "sequence_number"],
             "properties": {"type": {"type": "string"}, "sequence_number": {"type": "integer"},
                            "response": _ref(rp.ResponseObject)}},
            _ref(p.ErrorResponse)]}}}}
    operation = _post(rp.ResponseRequest, rp.ResponseObject, "Answer input items (stateless: previous_response_id "
                      "and store: true are refused).", (400, 401, 404, 413, 429, 500, 503))
    operation["post"]["responses"]["200"] = {
        "description": "The response; with `stream: true`, the Responses API's Server-Sent Events "
                       "(`response.created`, `response.output_text.delta`, …, `response.completed`).",
        "content": {"application/json": {"schema": _ref(rp.ResponseObject)},
                    "text/event-stream": {"schema": event}}}
    return operation


def _requires(field: str, value_type: str, then_field: str) -> dict[str, Any]:
    """JSON Schema: when ``field`` holds a ``value_type``, ``then_field`` must be true."""
    return {"if": {"required": [field], "properties": {field: {"type": value_type}}},
            "then": {"required": [then_field], "properties": {then_field: {"const": True}}}}


def openapi_schema(config: ServerConfig, max_instances: int | None = None,
                   max_model_len: int | None = None) -> dict[str, Any]:
    """The document for a server with ``config`` (its ``max_n`` and keys show in it) whose
    deployments allow at most ``max_instances`` instances and ``max_model_len`` tokens."""
    _, components = msgspec.json.schema_components(SCHEMAS, ref_template=REF)
    # What the Structs cannot say: limits of this server, and parameters that need another.
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        components[name]["properties"]["n"]["maximum"] = config.max_n
        components[name]["allOf"] = [_requires("stream_options", "object", "stream")]
    components["CompletionRequest"]["properties"]["prompt"] = p.PROMPT_SCHEMA
    components["EmbeddingRequest"]["properties"]["input"] = ep.INPUT_SCHEMA
    components["EmbeddingRequest"]["properties"]["encoding_format"] = ep.ENCODING_FORMAT_SCHEMA
    components["ChatCompletionRequest"]["allOf"].append(_requires("top_logprobs", "integer", "logprobs"))
    if max_model_len is not None:
        for name, field in (("CompletionRequest", "max_tokens"), ("ChatCompletionRequest", "max_tokens"),
                            ("ChatCompletionRequest", "max_completion_tokens")):
            for option in components[name]["properties"][field].get("anyOf", []):
                if option.get("type") == "integer":
                    option["maximum"] = max_model_len
    if max_instances is not None:
        components["ScaleRequest"]["properties"]["instances"]["maximum"] = max_instances
    api_security: list[dict[str, list[str]]] = [{"bearer": []}] if config.api_key else []
    admin_security: list[dict[str, list[str]]] = [{"bearer": []}] if (config.admin_key or config.api_key) else []
    model_param = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    name_param = model_param
    deployment_param = {"name": "deployment", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "The deployment (default: the first one)."}
    paths: dict[str, Any] = {
        "/v1/models": {"get": {"summary": "Every deployment and alias this server serves.",
                               "responses": {"200": _json(p.ModelList, "The models."), **_errors(401)}}},
        "/v1/models/{model}": {"get": {"summary": "One served model.", "parameters": [model_param],
                                       "responses": {"200": _json(p.ModelCard, "The model."), **_errors(401, 404)}}},
        "/v1/completions": _generation(p.CompletionRequest, p.Completion, p.Completion, "Complete prompts."),
        "/v1/chat/completions": _generation(p.ChatCompletionRequest, p.ChatCompletion, p.ChatCompletionChunk,
                                            "Answer a conversation."),
        "/v1/responses": _responses(),
        "/v1/embeddings": _post(ep.EmbeddingRequest, ep.EmbeddingResponse, "Embed inputs: one L2-normalized vector "
                                "each, pooled as the deployment says (last token or mean).",
                                (400, 401, 404, 413, 429, 500, 503)),
        "/tokenize": _post(tk.TokenizeRequest, tk.TokenizeResponse, "Token ids of a prompt, or of a chat rendered "
                           "by the model's template (vLLM's shapes).", (400, 401, 404, 413, 503)),
        "/detokenize": _post(tk.DetokenizeRequest, tk.DetokenizeResponse, "The text of token ids (vLLM's shapes).",
                             (400, 401, 404, 413, 503)),
        "/health": {"get": {"summary": "Liveness: 503 when a deployment's engine is dead.", "responses": {
            "200": _json(ops.HealthResponse, "Alive."), "503": _json(ops.HealthResponse, "A deployment is dead.")}}},
        "/ready": {"get": {"summary": "Readiness: every deployment has a ready instance.", "responses": {
            "200": _json(ops.HealthResponse, "Ready."), "503": _json(ops.HealthResponse, "Not ready yet.")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics.", "responses": {"200": {
            "description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/admin/scale": {"post": {
            "summary": "Set a deployment's instance count.",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(ops.ScaleRequest)}}},
            "responses": {"200": _json(ops.ScaleResponse, "The new target."), **_errors(400, 401, 404, 413)}}},
        "/admin/status": {"get": {
            "summary": "A deployment's instances and target.", "parameters": [deployment_param],
            "responses": {"200": _json(ops.StatusResponse, "The deployment's instances."), **_errors(401, 404)}}},
        "/admin/deployments": {
            "get": {"summary": "Every deployment with its instances by state, and the aliases.",
                    "responses": {"200": _json(ops.DeploymentList, "The deployments."), **_errors(401)}},
            "post": {"summary": "Add a deployment; requests for it wait while its first instance warms.",
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": _ref(DeploymentSpec)}}},
                     "responses": {"201": _json(ops.DeploymentStatus, "The deployment runs."),
                                   **_errors(400, 401, 409, 413, 500, 503)}}},
        "/admin/deployments/{name}": {"delete": {
            "summary": "Drain a deployment (its requests finish, new ones get 404), then stop it.",
            "parameters": [{**name_param, "name": "name"}],
            "responses": {"200": _json(ops.RemovedDeployment, "Removed."), **_errors(401, 404)}}},
        "/admin/aliases": {"post": {
            "summary": "Point an alias at a deployment (atomically; running requests stay where they are).",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(ops.AliasRequest)}}},
            "responses": {"200": _json(ops.AliasResponse, "The alias."), **_errors(400, 401, 404, 409, 413)}}},
        "/admin/aliases/{alias}": {"delete": {
            "summary": "Stop serving an alias.", "parameters": [{**name_param, "name": "alias"}],
            "responses": {"200": _json(ops.AliasResponse, "Removed."), **_errors(401, 404)}}},
    }
    for path, item in paths.items():
        security = admin_security if path.startswith("/admin") else api_security
        if path not in OPEN_PATHS and security:
            for operation in item.values():
                operation["security"] = security
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "FlowServe OpenAI-compatible API", "version": __version__},
        "paths": paths,
        "components": {"schemas": components},
    }
    if api_security or admin_security:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return document
