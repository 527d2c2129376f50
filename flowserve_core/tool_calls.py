"""The tool-calling seam: tool-call parser plugins, and the tokenizer capability that renders
tools into a prompt.

With ``tool_choice: "auto"`` the model decides whether to call a tool, in its family's own
markup (Hermes/Qwen ``<tool_call>{…}</tool_call>``, Llama 3's JSON, Mistral's
``[TOOL_CALLS][…]``). A parser, chosen per deployment by name (``tool_call_parser``,
``--tool-call-parser``, vLLM's flag) or detected from the chat template, turns that text back
into OpenAI's ``tool_calls``; plugins register parsers with ``flowserve_register_tool_parsers``.
(``required`` and a named function need no parser: structured output makes the model write
the calls as JSON.)

Streaming: a parser that also has the ``StreamsToolCalls`` capability reads a reply as it is
generated (one ``ToolCallStream`` per choice), so the frontend sends each call's name as soon as
it is known and its arguments as they are written, as vLLM's tool parsers do. A parser without it
keeps the simpler behaviour: content streams up to ``start_marker``, the rest is parsed whole at
the end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import msgspec

if TYPE_CHECKING:
    from flowserve_core.types import DeploymentSpec


class ParsedToolCall(msgspec.Struct, kw_only=True):
    """One call the model made: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


class ParsedOutput(msgspec.Struct, kw_only=True):
    """A reply split into its text for the user (``content``, None when there is none) and the
    tool calls it made, in order."""

    content: str | None = None
    tool_calls: list[ParsedToolCall] = []


@runtime_checkable
class ToolCallParser(Protocol):
    """Reads one model family's tool-call markup. Stateless: one parser serves every request."""

    #: The text that starts the calls (``"<tool_call>"``); while streaming, text before it is
    #: content, and from it on the output is held until it can be parsed whole.
    start_marker: str

    def parse(self, text: str) -> ParsedOutput:
        """Split a whole reply into content and calls; text that is not a well-formed call
        stays content (a parser never loses text)."""


class ToolCallPart(msgspec.Struct, kw_only=True):
    """A piece of a reply read while streaming: ``content`` text for the user, or a piece of
    the tool call ``index`` (0, 1, … in the reply's order): its ``name`` on the call's first
    piece only, and a fragment of its ``arguments`` JSON text (possibly empty)."""

    content: str = ""
    index: int = -1
    name: str | None = None
    arguments: str = ""


@runtime_checkable
class ToolCallStream(Protocol):
    """One reply being read as it is generated (the state of one choice).

    The contract, for a well-formed reply: the ``arguments`` fragments of call ``i`` joined are
    exactly the ``arguments`` that ``parse`` gives call ``i`` of the whole reply, and the
    ``content`` pieces joined are its ``content`` (``""`` for None). For a malformed or cut-short
    one, what was already streamed stands and the rest comes as content."""

    def push(self, text: str) -> list[ToolCallPart]:
        """The pieces that ``text``, the reply's next characters, completes."""

    def finish(self) -> list[ToolCallPart]:
        """The pieces still held when the reply ends (e.g. text that could have begun a marker)."""


@runtime_checkable
class StreamsToolCalls(Protocol):
    """Optional, for a ``ToolCallParser``: read replies incrementally."""

    def stream(self) -> ToolCallStream:
        """A new reader for one reply."""


@runtime_checkable
class ReadsSpecialTokens(Protocol):
    """Optional, for a ``ToolCallParser`` whose markup is made of special tokens (Mistral's
    ``[TOOL_CALLS]``): the frontend decodes the replies it parses with special tokens kept
    (``skip_special_tokens`` false), as vLLM's Mistral parser sets on the request. ``True`` to
    ask for it."""

    reads_special_tokens: bool


class ToolCallParserFactory(Protocol):
    """Builds a deployment's tool-call parser (server process)."""

    def __call__(self, spec: DeploymentSpec, /) -> ToolCallParser: ...


@runtime_checkable
class RendersTools(Protocol):
    """Optional, for a tokenizer: render chats that hold tool definitions, assistant turns with
    ``tool_calls`` and ``tool`` turns with the model's template, as transformers passes them
    (``tools`` as JSON-schema function definitions; each call's ``arguments`` as a mapping)."""

    def apply_tool_chat_template(self, messages: Sequence[Mapping[str, Any]],
                                 tools: Sequence[Mapping[str, Any]] | None) -> list[int]:
        """Token ids of the chat, ready for a reply; ``ValueError`` when the template refuses it."""

    def tool_call_markup(self) -> str | None:
        """The chat template's text (to detect a parser from its markup), or None."""
