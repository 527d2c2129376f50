"""The reader of ``tool_choice: "required"`` replies, as they are generated.

Structured output makes such a reply a JSON list of ``{"name": …, "parameters": {…}}`` objects
(``tools.tool_constraint``). The reader follows it character by character (linear in the reply)
and gives ``ToolCallPart``s as soon as they are sure: a call's first part once its name string is
complete, then its arguments as fragments of the raw JSON text of ``parameters`` as written
(nothing re-serialized, so the fragments joined are the arguments of the whole reply, which
``calls_of`` reads with the same reader). Parameters written before the name are held until it.

It lives here, not in flowserve-tool-parsers (whose scanner reads the parsers' markup): the
``required`` format is the frontend's own, works with no parser installed, and is fixed by the
grammar, so this small reader is all it needs. A reply that turns out malformed or is cut short
keeps what was already sent; if no call was sent, the whole reply comes as content at the end.
"""

from __future__ import annotations

import json

from flowserve_core.tool_calls import ParsedToolCall, ToolCallPart

_WHITESPACE = " \t\r\n"
_SCALAR_END = ",}]" + _WHITESPACE


class _ValueScan:
    """Where one JSON value starts and ends, from its characters one at a time (brackets and
    strings only: the grammar already made it valid JSON)."""

    def __init__(self) -> None:
        self.start: int | None = None
        self.end: int | None = None
        self.kind = ""
        self._depth = 0
        self._in_string = False
        self._escape = False

    def step(self, ch: str, at: int) -> bool:
        """Look at ``ch`` (at offset ``at``); False when it is not part of the value (the
        delimiter after a number or literal, left for the caller)."""
        if self.start is None:
            if ch in _WHITESPACE:
                return True
            self.start = at
            self.kind = "string" if ch == '"' else "container" if ch in "{[" else "scalar"
            self._in_string, self._depth = ch == '"', int(ch in "{[")
            return True
        if self.kind == "scalar":
            if ch in _SCALAR_END:
                self.end = at
                return False
            return True
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                if self.kind == "string":
                    self.end = at + 1
        elif ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            if self._depth == 0:
                self.end = at + 1
        return True


class RequiredCallsReader:
    """One ``required`` reply read as it streams (a ``ToolCallStream``): the calls' names and
    their arguments' fragments; ``complete`` once the list is closed."""

    def __init__(self) -> None:
        self.text = ""
        self.at = 0  # the next character to read
        self.state = "open"
        self.complete = False
        self.opened = 0  # calls whose first part was given
        self._index = -1
        self._name: str | None = None
        self._key = ""
        self._key_start = 0
        self._key_escape = False
        self._value = _ValueScan()
        self._sent = 0  # where the parameters' text not yet given starts
        self._held = ""  # parameters written before the name
        self._has_parameters = False

    def push(self, text: str) -> list[ToolCallPart]:
        """The parts that ``text``, the reply's next characters, completes."""
        self.text += text
        parts: list[ToolCallPart] = []
        while self.at < len(self.text) and self.state != "broken":
            self._read(self.text[self.at], parts)
        if self.state == "value" and self._key == "parameters" and self._value.start is not None:
            self._arguments(len(self.text), parts)
        return parts

    def finish(self) -> list[ToolCallPart]:
        """At the end of the reply: the whole reply as content when no call was given."""
        return [ToolCallPart(content=self.text)] if not self.opened and self.text else []

    def _broken(self) -> None:
        self.state, self.complete = "broken", False

    def _read(self, ch: str, parts: list[ToolCallPart]) -> None:
        state = self.state
        if state == "value":
            value = self._value
            if value.step(ch, self.at):
                self.at += 1
            if value.end is not None:
                self._value_done(parts)
            return
        self.at += 1
        if state == "in_key":
            if self._key_escape:
                self._key_escape = False
            elif ch == "\\":
                self._key_escape = True
            elif ch == '"':
                self._key, self.state = json.loads(self.text[self._key_start:self.at]), "colon"
            return
        if ch in _WHITESPACE:
            return
        if state == "open" and ch == "[":
            self.state = "first item"
        elif state in ("first item", "item") and ch == "{":
            self._index += 1
            self._name, self._held, self._has_parameters = None, "", False
            self.state = "first key"
        elif state in ("first key", "key") and ch == '"':
            self._key_start, self.state = self.at - 1, "in_key"
        elif state == "colon" and ch == ":":
            self._value, self.state = _ValueScan(), "value"
            self._sent = self.at
        elif state == "member end" and ch == ",":
            self.state = "key"
        elif state in ("first key", "member end") and ch == "}":
            self.state = "item end" if self._name is not None and self._has_parameters else "broken"
        elif state == "item end" and ch == ",":
            self.state = "item"
        elif state in ("first item", "item end") and ch == "]":
            self.state, self.complete = "done", True
        else:
            self._broken()

    def _value_done(self, parts: list[ToolCallPart]) -> None:
        value = self._value
        assert value.start is not None and value.end is not None
        self.state = "member end"
        if self._key == "parameters":
            if self._has_parameters:
                self._broken()
                return
            self._has_parameters = True
            self._arguments(value.end, parts)
        elif self._key == "name":
            if value.kind != "string" or self._name is not None:
                self._broken()
                return
            self._name = json.loads(self.text[value.start:value.end])
            parts.append(ToolCallPart(index=self._index, name=self._name, arguments=self._held))
            self.opened += 1
            self._held = ""

    def _arguments(self, upto: int, parts: list[ToolCallPart]) -> None:
        """The parameters' text up to ``upto`` not given yet (from the value's first character)."""
        start = max(self._sent, self._value.start or 0)
        if upto <= start:
            return
        fragment, self._sent = self.text[start:upto], upto
        if self._name is None:
            self._held += fragment
        else:
            parts.append(ToolCallPart(index=self._index, arguments=fragment))


def calls_of(text: str) -> list[ParsedToolCall] | None:
    """The calls of a whole ``required`` reply, arguments as written; None when it is not a
    complete list of calls (cut short by ``max_tokens``)."""
    reader = RequiredCallsReader()
    parts = reader.push(text) + reader.finish()
    if not reader.complete:
        return None
    try:
        json.loads(text)
    except ValueError:
        return None
    calls: list[ParsedToolCall] = []
    for part in parts:
        if part.name is not None:
            calls.append(ParsedToolCall(name=part.name, arguments=part.arguments))
        elif part.index >= 0:
            calls[part.index].arguments += part.arguments
    return calls
