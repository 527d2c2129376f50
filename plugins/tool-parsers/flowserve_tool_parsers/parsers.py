"""The parsers. Each is stateless; ``parse`` reads a whole reply and ``stream`` gives a reader
that follows one reply as it is generated (``streams.py``), the same reader ``parse`` runs, so
that a streamed reply and the whole one give the same content and calls."""

from __future__ import annotations

from flowserve_core.tool_calls import ParsedOutput
from flowserve_tool_parsers.streams import HermesReader, Llama3Reader, MistralReader, Reader, parse_with


class HermesParser:
    """``<tool_call>{"name": …, "arguments": {…}}</tool_call>``, one block per call (Hermes 2/3,
    Qwen 2.5/3); the text around the blocks is content. A last block the reply cut short (no
    closing tag) is read up to the end."""

    start_marker = "<tool_call>"

    def parse(self, text: str) -> ParsedOutput:
        """The text outside the ``<tool_call>`` blocks, and each block's call."""
        return parse_with(self.stream(), text)

    def stream(self) -> Reader:
        """A reader for one reply."""
        return HermesReader()


class Llama3JSONParser:
    """Llama 3.1/3.2's JSON tool calls: ``{"name": …, "parameters": {…}}`` (or ``"arguments"``),
    optionally after ``<|python_tag|>``, several separated by ``;``; content before them."""

    start_marker = "{"

    def parse(self, text: str) -> ParsedOutput:
        """The calls when the reply ends in JSON call objects, else all content."""
        return parse_with(self.stream(), text)

    def stream(self) -> Reader:
        """A reader for one reply."""
        return Llama3Reader()


class MistralParser:
    """Mistral's ``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments"}`` (v3 templates),
    or ``name[ARGS]{…}`` per call (v11+ templates); content before the marker. The markers are
    special tokens: ``reads_special_tokens`` has the frontend keep them in the replies it parses."""

    start_marker = "[TOOL_CALLS]"
    reads_special_tokens = True

    def parse(self, text: str) -> ParsedOutput:
        """Content before ``[TOOL_CALLS]``, and the calls after it."""
        return parse_with(self.stream(), text)

    def stream(self) -> Reader:
        """A reader for one reply."""
        return MistralReader()
