"""The parsers. Each is stateless; ``parse`` reads a whole reply (the frontend holds streamed
text from ``start_marker`` on until the reply ends, then parses it)."""

from __future__ import annotations

import json
import re
from typing import Any

from flowserve_core.tool_calls import ParsedOutput, ParsedToolCall

_DECODER = json.JSONDecoder()


def _call(name: Any, arguments: Any) -> ParsedToolCall | None:
    """A call from a decoded name and arguments (an object, or JSON text of one), or None."""
    if not isinstance(name, str) or not name:
        return None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False))


def _objects(text: str, separators: str = " \t\r\n") -> list[Any] | None:
    """Every JSON value in ``text`` one after another (``separators`` between them), or None
    when anything else is there."""
    values: list[Any] = []
    at = 0
    while True:
        while at < len(text) and text[at] in separators:
            at += 1
        if at == len(text):
            return values
        try:
            value, at = _DECODER.raw_decode(text, at)
        except ValueError:
            return None
        values.append(value)


def _content(text: str) -> str | None:
    return text.strip() or None


class HermesParser:
    """``<tool_call>{"name": …, "arguments": {…}}</tool_call>``, one block per call (Hermes 2/3,
    Qwen 2.5/3); the text around the blocks is content. A last block the reply cut short (no
    closing tag) is read up to the end."""

    start_marker = "<tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.S)

    def parse(self, text: str) -> ParsedOutput:
        """The text outside the ``<tool_call>`` blocks, and each block's call."""
        start = text.find(self.start_marker)
        if start < 0:
            return ParsedOutput(content=_content(text))
        calls = []
        for block in self._BLOCK.findall(text[start:]):
            decoded = _objects(block)
            if not decoded or len(decoded) != 1 or not isinstance(decoded[0], dict):
                return ParsedOutput(content=_content(text))
            call = _call(decoded[0].get("name"), decoded[0].get("arguments", decoded[0].get("parameters")))
            if call is None:
                return ParsedOutput(content=_content(text))
            calls.append(call)
        outside = self._BLOCK.sub("", text[start:])
        return ParsedOutput(content=_content(text[:start] + outside), tool_calls=calls)


class Llama3JSONParser:
    """Llama 3.1/3.2's JSON tool calls: ``{"name": …, "parameters": {…}}`` (or ``"arguments"``),
    optionally after ``<|python_tag|>``, several separated by ``;``; content before them."""

    start_marker = "{"

    def parse(self, text: str) -> ParsedOutput:
        """The calls when the reply ends in JSON call objects, else all content."""
        body = text.replace("<|python_tag|>", "")
        start = body.find("{")
        if start < 0:
            return ParsedOutput(content=_content(text))
        decoded = _objects(body[start:], separators=" \t\r\n;")
        if not decoded or not all(isinstance(d, dict) for d in decoded):
            return ParsedOutput(content=_content(text))
        calls = [_call(d.get("name"), d.get("parameters", d.get("arguments"))) for d in decoded]
        if any(c is None for c in calls):
            return ParsedOutput(content=_content(text))
        return ParsedOutput(content=_content(body[:start]), tool_calls=[c for c in calls if c is not None])


class MistralParser:
    """Mistral's ``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments"}`` (v3 templates),
    or ``name[ARGS]{…}`` per call (v11+ templates); content before the marker. The marker is a
    special token: the deployment must keep special tokens in the text (``skip_special_tokens``
    false) for this parser to see it."""

    start_marker = "[TOOL_CALLS]"
    _NAMED = re.compile(r"\s*([A-Za-z0-9_.\-]+)\[ARGS\]")

    def parse(self, text: str) -> ParsedOutput:
        """Content before ``[TOOL_CALLS]``, and the calls after it."""
        start = text.find(self.start_marker)
        if start < 0:
            return ParsedOutput(content=_content(text))
        rest = text[start:].replace(self.start_marker, " ")
        calls = self._json_list(rest) if rest.lstrip().startswith("[") else self._named(rest)
        if calls is None:
            return ParsedOutput(content=_content(text))
        return ParsedOutput(content=_content(text[:start]), tool_calls=calls)

    @staticmethod
    def _json_list(rest: str) -> list[ParsedToolCall] | None:
        decoded = _objects(rest)
        if not decoded or not all(isinstance(d, list) for d in decoded):
            return None
        calls = [_call(d.get("name"), d.get("arguments")) if isinstance(d, dict) else None
                 for group in decoded for d in group]
        return None if not calls or any(c is None for c in calls) else [c for c in calls if c is not None]

    def _named(self, rest: str) -> list[ParsedToolCall] | None:
        calls, at = [], 0
        while rest[at:].strip():
            match = self._NAMED.match(rest, at)
            if match is None:
                return None
            try:
                arguments, at = _DECODER.raw_decode(rest, match.end())
            except ValueError:
                return None
            call = _call(match.group(1), arguments)
            if call is None:
                return None
            calls.append(call)
        return calls or None
