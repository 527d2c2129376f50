"""``POST /v1/responses``, the stateless subset of OpenAI's Responses API, as a chat underneath.

The request becomes a ``ChatCompletionRequest`` — ``instructions`` a system message, ``input``
the conversation (a string, or message, ``function_call`` and ``function_call_output`` items),
``max_output_tokens``, ``temperature``/``top_p``, ``text.format`` as ``response_format``, function
``tools`` and ``tool_choice`` — and runs through the same checks, structured output and tool
handling as ``/v1/chat/completions``. The answer is a ``response`` object whose ``output`` holds a
``message`` item and ``function_call`` items; streamed, it is the Responses API's typed events
(``response.created``, ``response.output_text.delta``, …, ``response.completed``), function
calls included as they are written where the chat would stream them (a named function,
``required``, or a parser that reads replies as they come): ``response.output_item.added`` when the name is
known, then ``response.function_call_arguments.delta`` per fragment; the items come in the
order the model wrote them. Otherwise the calls come whole at the end. Anything
stateful is a 400: ``previous_response_id``, and ``store: true`` (nothing is kept).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from msgspec import UnsetType
from starlette.requests import Request

from flowserve_core.tool_calls import ParsedOutput
from flowserve_openai.api import ChatPlan, plan_chat
from flowserve_openai.errors import APIError
from flowserve_openai.generation import ChoiceEvent, Generation
from flowserve_openai.protocol import (
    AssistantMessageParam,
    ChatCompletionRequest,
    MessageParam,
    SystemMessageParam,
    ToolMessageParam,
    UserMessageParam,
    encoder,
)
from flowserve_openai.protocol_tools import (
    FunctionDefinition,
    FunctionName,
    JSONObjectResponseFormat,
    JSONSchemaResponseFormat,
    JSONSchemaSpec,
    NamedToolChoice,
    ResponseFormat,
    TextResponseFormat,
    ToolCall,
    ToolCallDelta,
    ToolCallFunction,
    ToolParam,
)
from flowserve_openai.responses import GenerationResponse
from flowserve_openai.responses_protocol import (
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    MessageItem,
    NamedFunction,
    OutputText,
    OutputTokensDetails,
    ResponseObject,
    ResponseRequest,
    ResponseUsage,
    TextConfig,
)
from flowserve_openai.tools import ToolStream, read_reply

INPUT_ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")


def _hex() -> str:
    return uuid.uuid4().hex


async def create_response(request: Request) -> Any:
    """``POST /v1/responses``."""
    received = time.time()
    ctx = request.app.state.flowserve
    body = await ctx.decode(request, ResponseRequest)
    if body.previous_response_id is not None:
        raise APIError(400, "previous_response_id is not supported: this server keeps no responses; send the whole "
                            "conversation in input", param="previous_response_id", code="unsupported_parameter")
    if body.store:
        raise APIError(400, "store: true is not supported: this server keeps no responses", param="store",
                       code="unsupported_parameter")
    chat = ChatCompletionRequest(
        model=body.model, messages=_messages(body), max_completion_tokens=body.max_output_tokens,
        temperature=body.temperature, top_p=body.top_p, stream=body.stream, response_format=_format(body.text),
        tools=[ToolParam(function=FunctionDefinition(name=t.name, description=t.description, parameters=t.parameters,
                                                     strict=t.strict)) for t in body.tools] if body.tools else None,
        tool_choice=(NamedToolChoice(function=FunctionName(name=body.tool_choice.name))
                     if isinstance(body.tool_choice, NamedFunction) else body.tool_choice),
        parallel_tool_calls=body.parallel_tool_calls)
    plan = await plan_chat(ctx, chat)
    renderer = ResponsesRenderer(body, plan, model=body.model or plan.deployment.name)
    generation = Generation(plan.deployment, plan.plans, ctx.metrics, arrival_time=received)
    return GenerationResponse(generation, renderer, body.stream)


def _messages(body: ResponseRequest) -> list[MessageParam]:
    """The conversation: ``instructions`` first, then ``input``'s items."""
    messages: list[MessageParam] = []
    if body.instructions:
        messages.append(SystemMessageParam(content=body.instructions))
    if isinstance(body.input, str):
        messages.append(UserMessageParam(content=body.input))
        return messages
    for i, item in enumerate(body.input):
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, i))
        elif kind == "function_call":
            call = ToolCall(id=_text(item, "call_id", i), function=ToolCallFunction(
                name=_text(item, "name", i), arguments=_text(item, "arguments", i)))
            last = messages[-1] if messages else None
            if isinstance(last, AssistantMessageParam) and last.tool_calls:
                last.tool_calls.append(call)  # parallel calls: one assistant turn
            else:
                messages.append(AssistantMessageParam(content=None, tool_calls=[call]))
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append(ToolMessageParam(tool_call_id=_text(item, "call_id", i),
                                             content=output if isinstance(output, str) else json.dumps(output)))
        else:
            raise APIError(400, f"input[{i}] is a {kind!r} item; only message, function_call and function_call_output "
                                "items are supported", param=f"input[{i}].type", code="unsupported_parameter")
    return messages


def _message(item: dict[str, Any], i: int) -> MessageParam:
    role = item.get("role")
    if role not in INPUT_ROLES:
        raise APIError(400, f"input[{i}].role must be one of {', '.join(INPUT_ROLES)}, got {role!r}",
                       param=f"input[{i}].role", code="invalid_value")
    content = item.get("content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
                raise APIError(400, f"input[{i}].content[{j}] must be a text part ({', '.join(TEXT_PARTS)})",
                               param=f"input[{i}].content[{j}]", code="unsupported_parameter")
            parts.append(part["text"])
        content = "\n".join(parts)
    if not isinstance(content, str):
        raise APIError(400, f"input[{i}].content must be a string or a list of text parts", param=f"input[{i}].content",
                       code="invalid_value")
    if role == "assistant":
        return AssistantMessageParam(content=content)
    return UserMessageParam(content=content) if role == "user" else SystemMessageParam(content=content)


def _text(item: dict[str, Any], key: str, i: int) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise APIError(400, f"input[{i}].{key} must be a string", param=f"input[{i}].{key}", code="invalid_value")
    return value


def _format(text: TextConfig | None) -> ResponseFormat | None:
    """``text.format`` as chat's ``response_format``."""
    form = text.format if text is not None else None
    if form is None or form.type == "text":
        return None if form is None else TextResponseFormat()
    if form.type == "json_object":
        return JSONObjectResponseFormat()
    return JSONSchemaResponseFormat(json_schema=JSONSchemaSpec(
        name=form.name or "response", description=form.description, schema=form.schema, strict=form.strict))


class ResponsesRenderer:
    """The Responses API's shapes for one choice: the ``response`` object, or its stream of events."""

    def __init__(self, body: ResponseRequest, plan: ChatPlan, model: str):
        self.request, self.plan, self.model = body, plan, model
        self.id, self.created = f"resp_{_hex()}", int(time.time())
        self.message_id = f"msg_{_hex()}"
        self.prompt_tokens = len(plan.prompts[0][0])
        self.text, self.tokens, self.cached = "", 0, 0
        self.finish: str | None = None
        self.stream = ToolStream(plan.tools) if plan.tools is not None else None
        #: calls stream as they are written (a named call, ``required``, or a parser that reads
        #: replies as they come); otherwise they are sent whole at the end
        self.incremental = self.stream is not None and (self.stream.reader is not None
                                                        or self.stream.tools.mode == "named")
        self.sequence = 0
        self.message_open = False
        self.message_index = 0
        self.streamed = ""
        self.items: list[MessageItem | FunctionCallItem] = []  # the streamed output, in its order
        self.calls: dict[int, int] = {}  # a streamed call's index → its output index

    # ------------------------------------------------------------------ shared

    def _account(self, event: ChoiceEvent) -> None:
        self.text += event.text
        self.tokens += len(event.token_ids)
        self.cached = max(self.cached, event.cached_tokens)
        self.finish = event.finish_reason or self.finish

    def _reply(self) -> ParsedOutput:
        return read_reply(self.plan.tools, self.text) if self.plan.tools is not None else ParsedOutput(content=self.text)

    def _snapshot(self, status: Any, output: list[Any]) -> ResponseObject:
        usage = None
        if status != "in_progress":
            usage = ResponseUsage(input_tokens=self.prompt_tokens,
                                  input_tokens_details=InputTokensDetails(cached_tokens=self.cached),
                                  output_tokens=self.tokens, output_tokens_details=OutputTokensDetails(),
                                  total_tokens=self.prompt_tokens + self.tokens)
        body = self.request
        return ResponseObject(
            id=self.id, created_at=self.created, status=status, model=self.model, output=output, usage=usage,
            incomplete_details=IncompleteDetails() if status == "incomplete" else None,
            instructions=body.instructions, max_output_tokens=body.max_output_tokens, temperature=body.temperature,
            top_p=body.top_p, parallel_tool_calls=body.parallel_tool_calls is not False,
            tool_choice=body.tool_choice or ("auto" if body.tools else "none"), tools=body.tools or [],
            text=body.text or TextConfig(), metadata=body.metadata or {})

    def _status(self) -> str:
        return "incomplete" if self.finish == "length" else "completed"

    def _output(self, reply: ParsedOutput) -> list[Any]:
        output: list[Any] = []
        if reply.content or not reply.tool_calls:
            output.append(MessageItem(id=self.message_id, status=self._status(),  # type: ignore[arg-type]  # a Literal
                                      content=[OutputText(text=reply.content or "")]))
        for call in reply.tool_calls:
            output.append(FunctionCallItem(id=f"fc_{_hex()}", call_id=f"call_{_hex()[:24]}", name=call.name,
                                           arguments=call.arguments))
        return output

    # ------------------------------------------------------------------ not streamed

    def add(self, event: ChoiceEvent) -> None:
        """Collect ``event`` for the single JSON answer."""
        self._account(event)

    def body(self) -> bytes:
        """The whole response as JSON."""
        return encoder.encode(self._snapshot(self._status(), self._output(self._reply())))

    # ------------------------------------------------------------------ streamed

    def _event(self, kind: str, **fields: Any) -> bytes:
        self.sequence += 1
        data = encoder.encode({"type": kind, "sequence_number": self.sequence, **fields})
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def opening(self) -> list[bytes]:
        """``response.created`` and ``response.in_progress``."""
        snapshot = self._snapshot("in_progress", [])
        return [self._event("response.created", response=snapshot), self._event("response.in_progress",
                                                                                  response=snapshot)]

    def _text_events(self, delta: str) -> list[bytes]:
        events = []
        if not self.message_open:
            self.message_open, self.message_index = True, len(self.items)
            self.items.append(MessageItem(id=self.message_id, status="in_progress", content=[]))
            events += [self._event("response.output_item.added", output_index=self.message_index,
                                   item=self.items[-1]),
                       self._event("response.content_part.added", item_id=self.message_id,
                                   output_index=self.message_index, content_index=0, part=OutputText(text=""))]
        self.streamed += delta
        events.append(self._event("response.output_text.delta", item_id=self.message_id,
                                  output_index=self.message_index, content_index=0, delta=delta))
        return events

    def _call_events(self, part: ToolCallDelta) -> list[bytes]:
        """A streamed call's events: the item when it starts, then its arguments' deltas."""
        events = []
        if isinstance(part.id, str):
            name = part.function.name if isinstance(part.function.name, str) else ""
            self.calls[part.index] = len(self.items)
            self.items.append(FunctionCallItem(id=f"fc_{_hex()}", call_id=part.id, name=name, arguments="",
                                               status="in_progress"))
            events.append(self._event("response.output_item.added", output_index=self.calls[part.index],
                                      item=self.items[-1]))
        at = self.calls[part.index]
        item = self.items[at]
        fragment = part.function.arguments
        if isinstance(item, FunctionCallItem) and isinstance(fragment, str) and fragment:
            item.arguments += fragment
            events.append(self._event("response.function_call_arguments.delta", item_id=item.id, output_index=at,
                                      delta=fragment))
        return events

    def chunks(self, event: ChoiceEvent) -> list[bytes]:
        """The events for new text; at the end, the items' ``done`` events, function calls and
        ``response.completed``."""
        self._account(event)
        events: list[bytes] = []
        mode = self.plan.tools.mode if self.plan.tools is not None else "text"
        if self.stream is None:
            if event.text:
                events += self._text_events(event.text)
        elif self.incremental or mode in ("text", "parse"):
            pieces = self.stream.push(event.text)
            if event.finish_reason:
                pieces += self.stream.finish()[0]
            for piece in pieces:
                if isinstance(piece.content, str) and piece.content:
                    events += self._text_events(piece.content)
                if self.incremental and not isinstance(piece.tool_calls, UnsetType):  # else: whole, at the end
                    for part in piece.tool_calls:
                        events += self._call_events(part)
            if self.incremental and event.finish_reason:
                return events + self._finish_streamed()
        if event.finish_reason:
            events += self._finish()
        return events

    def _finish(self) -> list[bytes]:
        reply = self._reply()
        output = self._output(reply)
        events = []
        index = 0
        for item in output:
            if isinstance(item, MessageItem):
                if not self.message_open and item.content[0].text:
                    events += self._text_events(item.content[0].text)
                if self.message_open:
                    events += self._message_done(item, index)
                    index += 1
                continue
            events += [self._event("response.output_item.added", output_index=index, item=FunctionCallItem(
                           id=item.id, call_id=item.call_id, name=item.name, arguments="", status="in_progress")),
                       self._event("response.function_call_arguments.delta", item_id=item.id, output_index=index,
                                   delta=item.arguments),
                       self._event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                                   arguments=item.arguments),
                       self._event("response.output_item.done", output_index=index, item=item)]
            index += 1
        kept = [item for item in output if not isinstance(item, MessageItem) or self.message_open]
        status = self._status()
        events.append(self._event("response.completed" if status == "completed" else "response.incomplete",
                                  response=self._snapshot(status, kept)))
        return events

    def _message_done(self, item: MessageItem, index: int) -> list[bytes]:
        """The streamed message's ``done`` events (its text, its part, the item), its content set."""
        item.content = [OutputText(text=self.streamed)]
        return [self._event("response.output_text.done", item_id=item.id, output_index=index, content_index=0,
                            text=self.streamed),
                self._event("response.content_part.done", item_id=item.id, output_index=index, content_index=0,
                            part=item.content[0]),
                self._event("response.output_item.done", output_index=index, item=item)]

    def _finish_streamed(self) -> list[bytes]:
        """The ``done`` events of the items streamed as they came, in their order, then the end."""
        status = self._status()
        events = []
        for index, item in enumerate(self.items):
            if isinstance(item, MessageItem):
                item.status = "incomplete" if status == "incomplete" else "completed"
                events += self._message_done(item, index)
            else:
                item.status = "completed"
                events += [self._event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                                       arguments=item.arguments),
                           self._event("response.output_item.done", output_index=index, item=item)]
        events.append(self._event("response.completed" if status == "completed" else "response.incomplete",
                                  response=self._snapshot(status, list(self.items))))
        return events

    def closing(self) -> list[bytes]:
        """Nothing more: ``response.completed`` came with the last event."""
        return []
