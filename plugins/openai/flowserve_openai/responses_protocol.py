"""``/v1/responses`` bodies, the stateless subset, as msgspec Structs: the request, the response
object, its output items and usage. Input items are decoded loosely (``dict``) and checked by
``responses_api``, which names the item that is wrong."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from flowserve_openai.protocol import MAX_TOOLS, StreamOptions, TokenCount


class TextFormat(Struct, kw_only=True):
    """``text.format``: ``text``, ``json_object``, or ``json_schema`` (name, schema and strict inline)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class TextConfig(Struct, kw_only=True):
    """``text``: the output's format."""

    format: TextFormat | None = None


class FunctionTool(Struct, kw_only=True):
    """A function tool, flat as the Responses API writes it."""

    type: Literal["function"] = "function"
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(Struct, kw_only=True):
    """``tool_choice: {"type": "function", "name": …}``."""

    type: Literal["function"] = "function"
    name: str


class ResponseRequest(Struct, kw_only=True):
    """``POST /v1/responses``: stateless only (``previous_response_id`` and ``store: true`` are 400s)."""

    model: str | None = None
    input: str | Annotated[list[dict[str, Any]], Meta(min_length=1)]
    instructions: str | None = None
    max_output_tokens: TokenCount | None = None
    temperature: Annotated[float, Meta(ge=0.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    text: TextConfig | None = None
    tools: Annotated[list[FunctionTool], Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None


class OutputText(Struct, kw_only=True):
    """Text the model wrote."""

    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []


class MessageItem(Struct, tag="message", tag_field="type", kw_only=True):
    """An output message."""

    id: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = []


class FunctionCallItem(Struct, tag="function_call", tag_field="type", kw_only=True):
    """A call of a function tool; ``call_id`` is what its ``function_call_output`` answers."""

    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class InputTokensDetails(Struct, kw_only=True):
    """Prompt tokens the prefix cache served."""

    cached_tokens: int = 0


class OutputTokensDetails(Struct, kw_only=True):
    """Always 0: no reasoning models here."""

    reasoning_tokens: int = 0


class ResponseUsage(Struct, kw_only=True):
    """Token counts of a response."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(Struct, kw_only=True):
    """Why a response is incomplete."""

    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseObject(Struct, kw_only=True):
    """A response (``object: "response"``), whole or as a streamed event's snapshot."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[MessageItem | FunctionCallItem] = []
    usage: ResponseUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    error: Any = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    parallel_tool_calls: bool = True
    tool_choice: Any = "auto"
    tools: list[FunctionTool] = []
    text: TextConfig | None = None
    store: bool = False
    metadata: dict[str, str] = {}
