"""The bodies the OpenAI API sends and receives, as msgspec Structs.

Requests are decoded straight into these types (a wrong type or an out-of-range value is
a 400 naming the field); responses are encoded from them. ``/openapi.json`` is generated
from the same Structs, so the schema and the server cannot disagree.

Unknown request fields are ignored, as OpenAI-compatible servers do, so clients that send
newer fields keep working. Parameters the server cannot honour (``suffix``, ``best_of``
> 1) are declared with the only values it accepts, so the schema says
what a request may hold and decoding refuses the rest.
vLLM's sampling extensions (``top_k``, ``min_p``, …) are accepted at the top level of the
body, where the openai client's ``extra_body`` puts them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from flowserve_openai.protocol_tools import (
    ResponseFormat,
    StructuredOutputsParam,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolParam,
)

INT32_MAX = 2**31 - 1
TokenId = Annotated[int, Meta(ge=0, le=INT32_MAX, description="A token id of the model's vocabulary.")]
TokenCount = Annotated[int, Meta(ge=1, le=INT32_MAX)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
#: vLLM takes any repetition_penalty > 0, but logits divided by 1e-300 overflow to inf: keep
#: it where it still means "discourage" or "encourage" repeats (1.0: off)
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 10.0
#: Stop strings are matched against every token's text on the event loop: keep them bounded.
MAX_STOP_STRINGS, MAX_STOP_LENGTH, MAX_STOP_TOKEN_IDS, MAX_PROMPTS = 16, 256, 256, 1024
StopString = Annotated[str, Meta(min_length=1, max_length=MAX_STOP_LENGTH)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
LogprobCount = Annotated[int, Meta(ge=0, le=20)]
#: OpenAI's range for ``logit_bias`` values; its keys are token ids written as strings.
LogitBias = Annotated[float, Meta(ge=-100.0, le=100.0)]
MAX_LOGIT_BIAS = 1024
MAX_TOOLS = 128

#: ``prompt`` as the OpenAPI document states it: msgspec's type is broader (one union of
#: items), ``completion_prompts`` enforces this one.
PROMPT_SCHEMA = {
    "description": "A string, a list of strings, a list of token ids, or a list of lists of token ids.",
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS, "items": {"type": "string", "minLength": 1}},
        {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": INT32_MAX}},
        {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS, "items": {
            "type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": INT32_MAX}}},
    ],
}

# ---------------------------------------------------------------- requests


class StreamOptions(Struct, kw_only=True):
    """``stream_options``: only valid with ``stream: true``."""

    include_usage: bool = False


class SamplingFields(Struct, kw_only=True):
    """Fields shared by completions and chat completions, vLLM's extensions included."""

    model: str | None = None
    n: Annotated[int, Meta(ge=1, le=INT32_MAX)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Meta(ge=0.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    seed: Seed | None = None
    stop: StopString | Annotated[list[StopString], Meta(max_length=MAX_STOP_STRINGS)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Annotated[dict[str, LogitBias], Meta(max_length=MAX_LOGIT_BIAS)] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: Annotated[int, Meta(ge=-1, le=INT32_MAX)] | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Meta(ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)] | None = None
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: Annotated[int, Meta(ge=0, le=INT32_MAX)] = 0
    skip_special_tokens: bool = True
    #: vLLM's: score the prompt, with this many alternatives per token (not with ``stream``)
    prompt_logprobs: LogprobCount | None = None
    # structured output: OpenAI's response_format, vLLM's structured_outputs and its older guided_* spellings
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParam | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    """``POST /v1/completions``."""

    prompt: str | list[str | TokenId | list[TokenId]]
    #: 0 only with ``echo``: the prompt scored, nothing generated (as OpenAI and vLLM)
    max_tokens: Annotated[int, Meta(ge=0, le=INT32_MAX)] | None = 16
    echo: bool = False
    logprobs: LogprobCount | None = None
    suffix: Annotated[str, Meta(max_length=0)] | None = None
    best_of: Annotated[int, Meta(ge=1, le=1)] | None = None


class TextPart(Struct, kw_only=True):
    """A text part of a message's ``content`` (the only kind of part a text model takes)."""

    type: Literal["text"]
    text: str


Content = str | list[TextPart]


class SystemMessageParam(Struct, tag="system", tag_field="role", kw_only=True):
    """A system message."""

    content: Content
    name: str | None = None


class DeveloperMessageParam(Struct, tag="developer", tag_field="role", kw_only=True):
    """A developer message (newer clients' name for system messages; read as ``system``)."""

    content: Content
    name: str | None = None


class UserMessageParam(Struct, tag="user", tag_field="role", kw_only=True):
    """A user message."""

    content: Content
    name: str | None = None


class AssistantMessageParam(Struct, tag="assistant", tag_field="role", kw_only=True):
    """An earlier answer of the assistant (its content may be null when it called tools)."""

    content: Content | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessageParam(Struct, tag="tool", tag_field="role", kw_only=True):
    """A tool's result, answering the assistant's call ``tool_call_id``."""

    content: Content
    tool_call_id: str


MessageParam = (SystemMessageParam | DeveloperMessageParam | UserMessageParam | AssistantMessageParam
                | ToolMessageParam)
#: What each message kind is called in ``role``.
ROLES: dict[type[MessageParam], str] = {
    SystemMessageParam: "system", DeveloperMessageParam: "system", UserMessageParam: "user",
    AssistantMessageParam: "assistant", ToolMessageParam: "tool"}


class ChatCompletionRequest(SamplingFields, kw_only=True):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[MessageParam], Meta(min_length=1)]
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    logprobs: bool | None = False
    top_logprobs: LogprobCount | None = None
    tools: Annotated[list[ToolParam], Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None


# ---------------------------------------------------------------- responses


class PromptTokensDetails(Struct, kw_only=True):
    """``usage.prompt_tokens_details``: how many prompt tokens the prefix cache served."""

    cached_tokens: int = 0


class Usage(Struct, kw_only=True):
    """Token counts of one call: the prompt(s) once, every choice's output."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(Struct, kw_only=True):
    """The legacy completions logprobs: parallel lists, one entry per token."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


FinishReason = Literal["stop", "length", "tool_calls"]


class PromptLogprob(Struct, kw_only=True):
    """vLLM's ``prompt_logprobs`` entry: one token's logprob, vocabulary rank and text."""

    logprob: float
    rank: int | None
    decoded_token: str


#: vLLM's ``prompt_logprobs``: per prompt token (the first has none), token id → its entry
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(Struct, kw_only=True):
    """One choice of a completion (or its part in a streamed chunk)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    prompt_logprobs: PromptLogprobs | UnsetType = UNSET


class Completion(Struct, kw_only=True):
    """A completion, and also each chunk of a streamed one (as OpenAI does)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None | UnsetType = UNSET


class TopLogprob(Struct, kw_only=True):
    """One alternative token in chat logprobs."""

    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(Struct, kw_only=True):
    """A sampled token in chat logprobs, with its ``top_logprobs`` alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct, kw_only=True):
    """``choices[].logprobs`` of a chat completion."""

    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class AssistantMessage(Struct, kw_only=True):
    """The message of a chat completion choice; ``tool_calls`` only when the model called tools."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | UnsetType = UNSET


class ChatChoice(Struct, kw_only=True):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletion(Struct, kw_only=True):
    """A chat completion (not streamed)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | UnsetType = UNSET


class ChatDelta(Struct, kw_only=True):
    """What a streamed chunk adds to a choice's message."""

    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType = UNSET
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET


class ChatChunkChoice(Struct, kw_only=True):
    """One choice's part of a streamed chat chunk."""

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(Struct, kw_only=True):
    """One Server-Sent Event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None | UnsetType = UNSET


class ModelCard(Struct, kw_only=True):
    """One served model: a deployment, or an alias (``root`` names its deployment)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "flowserve"
    root: str
    max_model_len: int


class ModelList(Struct, kw_only=True):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(Struct, kw_only=True):
    """OpenAI's error object: what went wrong, and which parameter (if one) is to blame."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Struct, kw_only=True):
    """Every error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


encoder = msgspec.json.Encoder()
