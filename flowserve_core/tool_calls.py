"""The tool-calling seam: tool-call parser plugins, and the tokenizer capability that renders
tools into a prompt.

With ``tool_choice: "auto"`` the model decides whether to call a tool, in its family's own
markup (Hermes/Qwen ``<tool_call>{…}</tool_call>``, Llama 3's JSON, Mistral's
``[TOOL_CALLS][…]``). A parser, chosen per deployment by name (``tool_call_parser``,
``--tool-call-parser``, vLLM's flag) or detected from the chat template, turns that text back
into OpenAI's ``tool_calls``; plugins register parsers with ``flowserve_register_tool_parsers``.
(``required`` and a named function need no parser: structured output makes the model write
the calls as JSON.)
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
