"""Incremental JSON scanners: they follow a JSON value (or an object's members) as its text is
generated, character by character, and say where each part starts and ends, without waiting
for the whole document. Every character is looked at once, so a reply streams in linear time.

They check the structure (brackets, strings, keys and colons) as they go; a finished member
value is also checked with ``json.loads``. Offsets are into the text the caller keeps growing
and passes to ``scan`` each time."""

from __future__ import annotations

import json
from dataclasses import dataclass

WHITESPACE = " \t\r\n"
_SCALAR_START = "-0123456789tfn"


class Malformed(Exception):
    """The text is not the JSON the scanner expected."""


class ValueScanner:
    """One JSON value starting at ``origin`` (after optional whitespace)."""

    def __init__(self, origin: int):
        self.at = origin  # the next character to look at
        self.start: int | None = None  # the value's first character
        self.end: int | None = None  # one past its last, once it is complete
        self.kind = ""  # "string", "object", "array" or "scalar"
        self._depth = 0
        self._in_string = False
        self._escape = False

    def scan(self, text: str, final: bool = False) -> None:
        """Look at ``text[self.at:]``; ``final``: the text ends there (ends a number)."""
        while self.end is None and self.at < len(text):
            self._step(text, text[self.at])
        if final and self.end is None and self.kind == "scalar":
            self._end_scalar(text, len(text))

    def _step(self, text: str, ch: str) -> None:
        if self.start is None:
            if ch in WHITESPACE:
                self.at += 1
                return
            self.start = self.at
            if ch == '"':
                self.kind, self._in_string = "string", True
            elif ch in "{[":
                self.kind, self._depth = ("object" if ch == "{" else "array"), 1
            elif ch in _SCALAR_START:
                self.kind = "scalar"
            else:
                raise Malformed(f"no JSON value starts with {ch!r}")
            self.at += 1
            return
        if self.kind == "scalar":
            if ch in ",}]" or ch in WHITESPACE:
                self._end_scalar(text, self.at)  # the delimiter is the caller's
                return
            self.at += 1
            return
        self.at += 1
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
                if self.kind == "string":
                    self.end = self.at
            return
        if ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            if self._depth == 0:
                self.end = self.at

    def _end_scalar(self, text: str, end: int) -> None:
        assert self.start is not None
        try:
            json.loads(text[self.start:end])
        except ValueError:
            raise Malformed(f"{text[self.start:end]!r} is not a JSON value") from None
        self.end = end


@dataclass
class Member:
    """A member of an object: its key and its value's scanner."""

    key: str
    value: ValueScanner


class ObjectScanner:
    """One JSON object starting at ``origin`` (after optional whitespace): its members as they
    come. ``end`` is one past its closing brace, once it is complete."""

    def __init__(self, origin: int):
        self.at = origin
        self.end: int | None = None
        self.members: list[Member] = []
        self._state = "open"  # open, first, key, in_key, colon, value, next
        self._key_start = 0
        self._key_escape = False

    def scan(self, text: str, final: bool = False) -> None:
        """Look at ``text[self.at:]``."""
        while self.end is None and self.at < len(text):
            state = self._state
            if state == "value":
                value = self.members[-1].value
                value.scan(text, final)
                self.at = value.at
                if value.end is None:
                    return
                if value.kind != "scalar":
                    try:
                        json.loads(text[value.start:value.end])
                    except ValueError:
                        raise Malformed(f"the value of {self.members[-1].key!r} is not JSON") from None
                self._state = "next"
                continue
            ch = text[self.at]
            self.at += 1
            if state == "in_key":
                if self._key_escape:
                    self._key_escape = False
                elif ch == "\\":
                    self._key_escape = True
                elif ch == '"':
                    self.members.append(Member(json.loads(text[self._key_start:self.at]), ValueScanner(0)))
                    self._state = "colon"
                continue
            if ch in WHITESPACE:
                continue
            if state == "open" and ch == "{":
                self._state = "first"
            elif state in ("first", "key") and ch == '"':
                self._key_start, self._state = self.at - 1, "in_key"
            elif state == "colon" and ch == ":":
                self.members[-1].value = ValueScanner(self.at)
                self._state = "value"
            elif state == "next" and ch == ",":
                self._state = "key"
            elif state in ("first", "next") and ch == "}":
                self.end = self.at
            else:
                raise Malformed(f"unexpected {ch!r} in a JSON object")
        if final and self._state == "value":
            value = self.members[-1].value
            value.scan(text, final)

    def member(self, *keys: str) -> Member | None:
        """The first member whose key is one of ``keys``."""
        return next((m for m in self.members if m.key in keys), None)
