"""Structured output from an API body: OpenAI's ``response_format`` (``json_object``,
``json_schema``), vLLM's ``structured_outputs`` and its older ``guided_json`` / ``guided_regex`` /
``guided_choice`` / ``guided_grammar``, as the kernel's ``StructuredOutput``; checked by the
deployment's structured-output backend (in a worker thread: compiling is compute) before
anything is admitted, so a constraint it cannot enforce is a 400 naming the feature."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from flowserve_core.structured_output import StructuredOutputBackend, UnsupportedConstraint
from flowserve_core.types import StructuredOutput
from flowserve_openai.errors import APIError
from flowserve_openai.protocol import SamplingFields
from flowserve_openai.protocol_tools import JSONObjectResponseFormat, JSONSchemaResponseFormat, StructuredOutputsParam

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment


def structured_output(body: SamplingFields) -> tuple[StructuredOutput, str] | None:
    """The constraint ``body`` asks for and the parameter that asked, or None (free text)."""
    asked: list[tuple[StructuredOutput, str]] = []
    response_format = body.response_format
    if isinstance(response_format, JSONObjectResponseFormat):
        asked.append((StructuredOutput(json_object=True), "response_format"))
    elif isinstance(response_format, JSONSchemaResponseFormat):
        schema = response_format.json_schema.schema
        if schema is None:
            raise APIError(400, "response_format.json_schema.schema is required for the json_schema response format",
                           param="response_format.json_schema.schema", code="invalid_value")
        asked.append((StructuredOutput(json=_schema_text(schema, "response_format.json_schema.schema")),
                      "response_format"))
    if body.structured_outputs is not None:
        asked.append((_from_vllm(body.structured_outputs), "structured_outputs"))
    if body.guided_json is not None:
        asked.append((StructuredOutput(json=_schema_text(body.guided_json, "guided_json")), "guided_json"))
    if body.guided_regex is not None:
        asked.append((StructuredOutput(regex=body.guided_regex), "guided_regex"))
    if body.guided_choice is not None:
        asked.append((_constraint("guided_choice", choice=body.guided_choice), "guided_choice"))
    if body.guided_grammar is not None:
        asked.append((StructuredOutput(grammar=body.guided_grammar), "guided_grammar"))
    if len(asked) > 1:
        names = ", ".join(param for _, param in asked)
        raise APIError(400, f"Only one kind of structured output may be asked for at once; this request has {names}",
                       param=asked[1][1], code="invalid_value")
    return asked[0] if asked else None


def _from_vllm(param: StructuredOutputsParam) -> StructuredOutput:
    json_text = None if param.json is None else _schema_text(param.json, "structured_outputs.json")
    return _constraint("structured_outputs", json=json_text, json_object=bool(param.json_object),
                       regex=param.regex, choice=param.choice, grammar=param.grammar)


def _constraint(param: str, **fields: Any) -> StructuredOutput:
    try:
        return StructuredOutput(**fields)
    except ValueError as exc:
        raise APIError(400, f"{param}: {str(exc).removeprefix('structured_output ')}", param=param,
                       code="invalid_value") from None


def _schema_text(schema: dict[str, Any] | str, param: str) -> str:
    """A JSON schema as canonical JSON text (a string must hold a JSON object or boolean)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise APIError(400, f"{param} is not valid JSON: {exc}", param=param, code="invalid_value") from None
    if not isinstance(schema, (dict, bool)):
        raise APIError(400, f"{param} must be a JSON schema (an object), got {type(schema).__name__}", param=param,
                       code="invalid_value")
    return msgspec.json.encode(schema, order="sorted").decode()


async def check_structured_output(backends: Any, deployment: Deployment, constraint: StructuredOutput, param: str) -> None:
    """Compile ``constraint`` with ``deployment``'s backend in a worker thread: a 400 naming the
    feature when the backend cannot enforce it."""
    backend: StructuredOutputBackend = await backends(deployment)
    try:
        await anyio.to_thread.run_sync(backend.check, constraint)
    except UnsupportedConstraint as exc:
        raise APIError(400, str(exc), param=param, code="unsupported_structured_output") from None
    except Exception as exc:  # the backend cannot work at all for this deployment (no tokenizer it can load)
        raise APIError(400, f"Structured output is not available for the model {deployment.name!r}: the "
                            f"{deployment.spec.structured_output_backend!r} backend failed ({exc})",
                       param=param, code="unsupported_structured_output") from None
