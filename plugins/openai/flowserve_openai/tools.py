"""Tool calling for ``/v1/chat/completions``: the prompt, the constraint and the reply.

- The prompt: tool definitions, assistant ``tool_calls`` and ``tool`` turns are rendered by the
  model's own chat template (a tokenizer with the ``RendersTools`` capability), as transformers
  passes them: ``tools`` as function definitions, each call's ``arguments`` as an object.
- ``tool_choice: "required"`` and a named function are enforced by structured output, as vLLM
  does: the model writes a JSON list of ``{"name", "parameters"}`` (required) or the named
  function's arguments (named), valid for the functions' parameter schemas.
- ``"auto"`` (the default when tools are given) leaves the choice to the model, whose markup the
  deployment's tool-call parser reads (``tool_call_parser``, else detected from the template);
  with no parser the reply stays content. ``"none"`` renders no tools and parses nothing.
- Streaming, as vLLM's tool parsers stream: with a parser that can read a reply as it comes
  (``StreamsToolCalls``: the three of flowserve-tool-parsers), content streams as content and
  each call as ``tool_calls`` deltas, its index, id, type and name first, then its arguments'
  fragments as the model writes them (joined, exactly the arguments of the unstreamed answer).
  A parser without it: content streams until its start marker, the rest is held and parsed
  when the reply ends, then sent. ``required`` replies stream the same way, read by
  ``required_calls`` (each call's name once written, then its ``parameters``' raw JSON text);
  a named call streams its arguments as they are generated.
- A parser whose markup is special tokens (``ReadsSpecialTokens``: Mistral's ``[TOOL_CALLS]``)
  gets them in the text: requests it parses decode with ``skip_special_tokens`` false, as
  vLLM's Mistral parser sets on the request.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import anyio
from msgspec import UNSET, UnsetType

from flowserve_core.tool_calls import (
    ParsedOutput,
    ParsedToolCall,
    ReadsSpecialTokens,
    RendersTools,
    StreamsToolCalls,
    ToolCallParser,
    ToolCallPart,
    ToolCallStream,
)
from flowserve_core.types import StructuredOutput
from flowserve_openai.errors import APIError
from flowserve_openai.prompts import check_prompt_chars
from flowserve_openai.protocol import AssistantMessageParam, ChatCompletionRequest, ChatDelta, ToolMessageParam
from flowserve_openai.protocol_tools import (
    NamedToolChoice,
    ToolCall,
    ToolCallDelta,
    ToolCallFunction,
    ToolCallFunctionDelta,
)
from flowserve_openai.required_calls import RequiredCallsReader, calls_of

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment
    from flowserve_core.interfaces import Tokenizer
    from flowserve_openai.context import AppContext

#: Chat-template markup → the parser that reads it, for deployments that name none.
DETECT = (("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"), ("<|python_tag|>", "llama3_json"))


@dataclass
class ToolPlan:
    """How one request's replies are read: ``parse`` with ``parser`` (auto), ``named`` (the
    reply is the arguments of ``name``), ``required`` (a JSON list of calls) or ``text``."""

    mode: Literal["text", "parse", "named", "required"]
    parser: ToolCallParser | None = None
    name: str = ""
    parallel: bool = True


def new_call_id() -> str:
    """An id for a tool call, in OpenAI's shape."""
    return f"call_{uuid.uuid4().hex[:24]}"


def uses_tools(body: ChatCompletionRequest) -> bool:
    """Whether the chat needs the tool-aware rendering (tools, tool turns or earlier calls)."""
    return bool(body.tools) or any(isinstance(m, ToolMessageParam) or
                                   (isinstance(m, AssistantMessageParam) and m.tool_calls) for m in body.messages)


def tool_choice(body: ChatCompletionRequest) -> str | NamedToolChoice:
    """The effective ``tool_choice``: ``auto`` with tools, ``none`` without (OpenAI's defaults)."""
    if body.tool_choice is None:
        return "auto" if body.tools else "none"
    if body.tool_choice != "none" and not body.tools:
        raise APIError(400, "tool_choice needs tools: this request defines none", param="tool_choice",
                       code="invalid_value")
    return body.tool_choice


def tool_constraint(body: ChatCompletionRequest) -> StructuredOutput | None:
    """The JSON schema that enforces ``required`` or a named function, or None."""
    choice = tool_choice(body)
    tools = {t.function.name: t.function for t in body.tools or []}
    if isinstance(choice, NamedToolChoice):
        function = tools.get(choice.function.name)
        if function is None:
            raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which tools does not "
                                f"define ({', '.join(tools)})", param="tool_choice", code="invalid_value")
        return StructuredOutput(json=json.dumps(function.parameters or {"type": "object"}))
    if choice != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"const": name},
                                               "parameters": function.parameters or {"type": "object"}},
              "required": ["name", "parameters"], "additionalProperties": False}
             for name, function in tools.items()]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if body.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return StructuredOutput(json=json.dumps(schema))


def chat_dicts(body: ChatCompletionRequest, messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict] | None]:
    """The messages as the template sees them (``tool_calls`` with object arguments, ``tool``
    turns with their ``tool_call_id``) and the tool definitions (none for ``tool_choice: none``)."""
    out = []
    for param, message in zip(body.messages, messages):
        entry: dict[str, Any] = {"role": message.role, "content": message.content}
        if isinstance(param, AssistantMessageParam) and param.tool_calls:
            entry["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": _arguments(call.function.arguments)}}
                for call in param.tool_calls]
        if isinstance(param, ToolMessageParam):
            entry["tool_call_id"] = param.tool_call_id
        out.append(entry)
    tools = None
    if body.tools and tool_choice(body) != "none":
        tools = [{"type": "function", "function": {k: v for k, v in (
            ("name", t.function.name), ("description", t.function.description),
            ("parameters", t.function.parameters or {"type": "object", "properties": {}})) if v is not None}}
            for t in body.tools]
    return out, tools


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # a template may print it as it is


async def tool_chat_prompt(chat: ChatCompletionRequest, messages: list[Any], tokenizer: Any, max_model_len: int,
                           lanes: Any) -> list[int]:
    """Token ids of a chat with tools or tool turns, ready for a reply (the checks of
    ``prompts.chat_prompt``, the tool definitions counted in its length)."""
    dicts, definitions = chat_dicts(chat, messages)
    chars = sum(len(m.content) for m in messages) + len(json.dumps(definitions or []))
    check_prompt_chars(chars, max_model_len, "messages")
    ids = await render_tool_chat(tokenizer, dicts, definitions, lanes, chars)
    if not ids:
        raise APIError(400, "messages render to an empty prompt", param="messages", code="invalid_value")
    return ids


async def render_tool_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict] | None,
                           lanes: Any, chars: int) -> list[int]:
    """Token ids of a tool chat, or a 400 when the tokenizer cannot render one."""
    if not isinstance(tokenizer, RendersTools):
        raise APIError(400, "This model's tokenizer cannot render tools or tool messages into a prompt.",
                       param="tools", code="unsupported_parameter")
    try:
        ids = await lanes.run(chars, lambda: tokenizer.apply_tool_chat_template(messages, tools))
    except Exception as exc:
        raise APIError(400, f"The model's chat template rejected these messages: {exc}", param="messages",
                       code="invalid_value") from None
    return list(ids)


def parser_name(deployment: Deployment, tokenizer: Tokenizer) -> str | None:
    """The deployment's ``tool_call_parser``, else the one whose markup its chat template uses."""
    if deployment.spec.tool_call_parser:
        return str(deployment.spec.tool_call_parser)
    template = tokenizer.tool_call_markup() if isinstance(tokenizer, RendersTools) else None
    return next((name for marker, name in DETECT if template and marker in template), None)


def plan(body: ChatCompletionRequest, parser: ToolCallParser | None) -> ToolPlan | None:
    """How this request's replies are read (None: no tools). A parser that reads special
    tokens has them kept in the body's decoding (``skip_special_tokens`` false)."""
    if not body.tools:
        return None
    choice = tool_choice(body)
    parallel = body.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        return ToolPlan("named", name=choice.function.name, parallel=parallel)
    if choice == "required":
        return ToolPlan("required", parallel=parallel)
    if choice == "auto" and parser is not None:
        if isinstance(parser, ReadsSpecialTokens) and parser.reads_special_tokens:
            body.skip_special_tokens = False
        return ToolPlan("parse", parser=parser, parallel=parallel)
    return ToolPlan("text")


def read_reply(tools: ToolPlan, text: str) -> ParsedOutput:
    """A whole reply as content and calls, as ``tools`` says to read it."""
    if tools.mode == "named":
        return ParsedOutput(tool_calls=[ParsedToolCall(name=tools.name, arguments=text)])
    if tools.mode == "required":
        parsed = calls_of(text)
        if parsed is None:  # cut short by max_tokens: leave it as text
            return ParsedOutput(content=text)
        return ParsedOutput(tool_calls=parsed[:None if tools.parallel else 1])
    if tools.mode == "parse" and tools.parser is not None:
        out = tools.parser.parse(text)
        if not tools.parallel:
            out.tool_calls = out.tool_calls[:1]
        return out
    return ParsedOutput(content=text)


def message_calls(calls: list[ParsedToolCall]) -> list[ToolCall]:
    """The response's ``tool_calls``."""
    return [ToolCall(id=new_call_id(), function=ToolCallFunction(name=c.name, arguments=c.arguments)) for c in calls]


@dataclass
class ToolStream:
    """One streamed choice of a request with tools: turns its text deltas into content and
    ``tool_calls`` deltas."""

    tools: ToolPlan
    text: str = ""
    sent: int = 0  # characters of ``text`` already sent as content
    holding: bool = False
    called: bool = False
    #: the reader of this reply, when it is read as it comes (a parser's, or ``required``'s)
    reader: ToolCallStream | None = None
    ids: dict[int, str] = field(default_factory=dict)  # the id of each call sent

    def __post_init__(self) -> None:
        parser = self.tools.parser
        if self.tools.mode == "parse" and isinstance(parser, StreamsToolCalls):
            self.reader = parser.stream()
        elif self.tools.mode == "required":
            self.reader = RequiredCallsReader()

    def push(self, delta: str) -> list[ChatDelta]:
        """Deltas to send for new text."""
        self.text += delta
        mode = self.tools.mode
        if self.reader is not None:
            return self._deltas(self.reader.push(delta)) if delta else []
        if mode == "named":
            out = []
            if not self.called:
                self.called = True
                out.append(ChatDelta(tool_calls=[ToolCallDelta(index=0, id=new_call_id(), type="function",
                                                               function=ToolCallFunctionDelta(name=self.tools.name,
                                                                                              arguments=""))]))
            if delta:
                out.append(ChatDelta(tool_calls=[ToolCallDelta(index=0,
                                                               function=ToolCallFunctionDelta(arguments=delta))]))
            return out
        if self.holding:
            return []
        if mode == "parse" and self.tools.parser is not None:
            marker = self.tools.parser.start_marker
            at = self.text.find(marker, self.sent)
            if at >= 0:
                self.holding = True
                return self._content(at)
            return self._content(len(self.text) - _partial_suffix(self.text, marker))
        return self._content(len(self.text))

    def _deltas(self, parts: list[ToolCallPart]) -> list[ChatDelta]:
        """A reader's pieces as deltas: consecutive content joined, a call's first delta with its
        index, id, type and name, its argument fragments joined per delta; with
        ``parallel_tool_calls`` false, calls after the first are left out."""
        out: list[ChatDelta] = []
        for part in parts:
            if part.index < 0:
                if out and isinstance(out[-1].content, str) and out[-1].tool_calls is UNSET:
                    out[-1].content += part.content
                else:
                    out.append(ChatDelta(content=part.content))
                continue
            if part.index > 0 and not self.tools.parallel:
                continue
            if part.name is not None:
                self.called = True
                self.ids[part.index] = new_call_id()
                out.append(ChatDelta(tool_calls=[ToolCallDelta(
                    index=part.index, id=self.ids[part.index], type="function",
                    function=ToolCallFunctionDelta(name=part.name, arguments=part.arguments))]))
                continue
            last = out[-1].tool_calls if out else UNSET
            if not isinstance(last, UnsetType) and last[0].index == part.index:
                previous = last[0].function.arguments
                last[0].function.arguments = (previous if isinstance(previous, str) else "") + part.arguments
            else:
                out.append(ChatDelta(tool_calls=[ToolCallDelta(
                    index=part.index, function=ToolCallFunctionDelta(arguments=part.arguments))]))
        return out

    def _content(self, upto: int) -> list[ChatDelta]:
        if upto <= self.sent:
            return []
        piece, self.sent = self.text[self.sent:upto], upto
        return [ChatDelta(content=piece)]

    def finish(self) -> tuple[list[ChatDelta], bool]:
        """Deltas for the rest of the reply, and whether it called tools."""
        if self.reader is not None:
            return self._deltas(self.reader.finish()), self.called
        if self.tools.mode == "named":
            return self.push("") if not self.called else [], True
        if self.tools.mode == "text" or not self.holding:
            return self._content(len(self.text)), False
        parsed = read_reply(self.tools, self.text)
        if not parsed.tool_calls:
            return self._content(len(self.text)), False
        out = []
        already = self.text[:self.sent]
        if parsed.content and parsed.content.startswith(already.strip()) and len(parsed.content) > len(already.strip()):
            out.append(ChatDelta(content=parsed.content[len(already.strip()):]))
        for index, call in enumerate(parsed.tool_calls):
            out.append(ChatDelta(tool_calls=[ToolCallDelta(index=index, id=new_call_id(), type="function",
                                                            function=ToolCallFunctionDelta(name=call.name))]))
            out.append(ChatDelta(tool_calls=[ToolCallDelta(index=index,
                                                           function=ToolCallFunctionDelta(arguments=call.arguments))]))
        return out, True


def _partial_suffix(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


async def parser_for(ctx: AppContext, deployment: Deployment, name: str | None) -> ToolCallParser | None:
    """The named parser of the deployment (a 400 when it is not installed), or None."""
    if name is None:
        return None
    try:
        return await anyio.to_thread.run_sync(deployment.pm.build, "tool_parser", name, deployment.spec)
    except Exception as exc:
        raise APIError(400, f"Tool calling is not available for the model {deployment.name!r}: {exc}",
                       param="tools", code="unsupported_parameter") from None

