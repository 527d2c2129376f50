"""The OpenAI API's structured-output and tool-calling pieces, as msgspec Structs (imported by
``protocol``, whose request and response bodies hold them): ``response_format``, vLLM's
``structured_outputs``, tool definitions and choices, and tool calls whole or streamed."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType


class JSONSchemaSpec(Struct, kw_only=True):
    """``response_format.json_schema``: the schema the output must validate against."""

    name: str = "response"
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class TextResponseFormat(Struct, tag="text", tag_field="type", kw_only=True):
    """``{"type": "text"}``: free text (the default)."""


class JSONObjectResponseFormat(Struct, tag="json_object", tag_field="type", kw_only=True):
    """``{"type": "json_object"}``: the output is one JSON object."""


class JSONSchemaResponseFormat(Struct, tag="json_schema", tag_field="type", kw_only=True):
    """``{"type": "json_schema", "json_schema": {...}}``: the output validates against the schema."""

    json_schema: JSONSchemaSpec


ResponseFormat = TextResponseFormat | JSONObjectResponseFormat | JSONSchemaResponseFormat


class StructuredOutputsParam(Struct, kw_only=True):
    """vLLM's ``structured_outputs``: exactly one of a JSON schema (an object, or its JSON text),
    any JSON object, a regular expression, a list of choices, or an EBNF grammar."""

    json: dict[str, Any] | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class ToolCallFunction(Struct, kw_only=True):
    """The function a tool call calls: its name and its arguments as JSON text."""

    name: str
    arguments: str


class ToolCall(Struct, kw_only=True):
    """One call of a tool, in an assistant message (request or response)."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class FunctionDefinition(Struct, kw_only=True):
    """A function the model may call: its name, what it does and its parameters' JSON schema."""

    name: Annotated[str, Meta(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolParam(Struct, kw_only=True):
    """One entry of ``tools`` (functions are the only kind)."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(Struct, kw_only=True):
    """The function a named ``tool_choice`` forces."""

    name: str


class NamedToolChoice(Struct, kw_only=True):
    """``tool_choice: {"type": "function", "function": {"name": …}}``: call exactly this function."""

    type: Literal["function"] = "function"
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolCallFunctionDelta(Struct, kw_only=True):
    """A streamed part of a tool call's function: its name first, then argument fragments."""

    name: str | UnsetType = UNSET
    arguments: str | UnsetType = UNSET


class ToolCallDelta(Struct, kw_only=True):
    """A streamed part of the tool call ``index``: its id and type come with its first part."""

    index: int
    id: str | UnsetType = UNSET
    type: Literal["function"] | UnsetType = UNSET
    function: ToolCallFunctionDelta
