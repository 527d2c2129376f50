"""The parsers' readers: each follows one reply as it is generated and says, as soon as it is
sure, what is content, when a call starts (its name) and each fragment of its arguments.

The arguments stream as the model writes them: the raw text of the JSON object after the
``"arguments"``/``"parameters"`` key (or after Mistral's ``[ARGS]``), so the fragments of a
call joined are the object exactly as written (vLLM re-serializes partial JSON instead; here
nothing is re-serialized, so the streamed and the whole answer agree to the character). An
argument given as a JSON string holding an object, or ``null``, comes whole once complete.

Content keeps the whole-reply rules: its leading and trailing whitespace is dropped, the rest
is sent as soon as no marker can begin in it. The parsers' ``parse`` runs the same readers
over the whole reply, so they agree by construction."""

from __future__ import annotations

import json

from flowserve_core.tool_calls import ParsedOutput, ParsedToolCall, ToolCallPart
from flowserve_tool_parsers.scanner import WHITESPACE, Malformed, ObjectScanner, ValueScanner


def partial_suffix(text: str, marker: str, start: int = 0) -> int:
    """How many characters at the end of ``text[start:]`` could be the start of ``marker``."""
    for size in range(min(len(marker) - 1, len(text) - start), 0, -1):
        if marker.startswith(text[len(text) - size:]):
            return size
    return 0


def whole_value_arguments(kind: str, raw: str) -> str:
    """The arguments of a value that does not stream: a JSON string holding an object (its text),
    or ``null`` (``{}``)."""
    value = json.loads(raw)
    if value is None:
        return "{}"
    if kind == "string":
        try:
            if isinstance(json.loads(value), dict):
                return str(value)
        except ValueError:
            pass
    raise Malformed("the arguments are not a JSON object")


class Reader:
    """What the readers share: the reply so far, the pieces to send, and the fall-back to
    content when the markup turns out malformed (from where it began, unless a call of it was
    already sent)."""

    call: ObjectCall  # the call being read, in the formats' call states
    value: ValueScanner  # Mistral's arguments after [ARGS], in its "args" state
    args: StreamedArguments

    def __init__(self) -> None:
        self.text = ""
        self.pos = 0  # the text before it is read
        self.state = "text"
        self.calls = 0  # calls started
        self.failed = False
        self.region = 0  # where the markup being read began
        self._region_calls = 0
        self._out: list[ToolCallPart] = []
        self._said = False
        self._held = ""  # whitespace after the content sent: sent only if more content follows

    def push(self, text: str) -> list[ToolCallPart]:
        """The pieces that ``text`` completes."""
        self.text += text
        self._advance(final=False)
        return self._take()

    def finish(self) -> list[ToolCallPart]:
        """The pieces still held at the end of the reply."""
        self._advance(final=True)
        return self._take()

    def _take(self) -> list[ToolCallPart]:
        out, self._out = self._out, []
        return out

    def _advance(self, final: bool) -> None:
        if not self.failed:
            try:
                self.read(final)
                return
            except Malformed:
                self.failed = True
                self.pos = self.region if self.calls == self._region_calls else self._read_to()
        self.say(self.text[self.pos:])
        self.pos = len(self.text)

    def _read_to(self) -> int:
        """How far the text was read (into the call or arguments being read)."""
        if self.state in ("call", "list_call"):
            return self.call.scanner.at
        return self.value.at if self.state == "args" else self.pos

    def read(self, final: bool) -> None:
        """Read on from ``pos`` (the format's own state machine); ``Malformed`` when the markup
        is not well formed."""
        raise NotImplementedError

    def begin(self, at: int) -> None:
        """Markup begins at ``at``: the content before it is said."""
        self.say(self.text[self.pos:at])
        self.region, self._region_calls, self.pos = at, self.calls, at

    def say_up_to_marker(self, marker: str, final: bool) -> None:
        """Content up to the end, but for an end that could begin ``marker``."""
        keep = 0 if final else partial_suffix(self.text, marker, self.pos)
        self.say(self.text[self.pos:len(self.text) - keep])
        self.pos = len(self.text) - keep

    def say(self, piece: str) -> None:
        """Content, its outer whitespace left out as ``parse`` strips it."""
        if not self._said:
            piece = piece.lstrip()
        body = piece.rstrip()
        if body:
            self._out.append(ToolCallPart(content=self._held + body))
            self._said, self._held = True, piece[len(body):]
        elif self._said:
            self._held += piece

    def open_call(self, name: str) -> None:
        """A call starts: its name."""
        if not name:
            raise Malformed("a call without a name")
        self._out.append(ToolCallPart(index=self.calls, name=name))
        self.calls += 1

    def arguments(self, fragment: str) -> None:
        """A fragment of the current call's arguments."""
        if fragment:
            self._out.append(ToolCallPart(index=self.calls - 1, arguments=fragment))


class StreamedArguments:
    """The arguments value of one call: sent raw while it is an object being written, whole
    once complete otherwise."""

    def __init__(self) -> None:
        self.sent_to: int | None = None
        self.done = False

    def follow(self, reader: Reader, value: ValueScanner) -> None:
        """Send what ``value`` (scanned on) adds."""
        if self.done or value.start is None:
            return
        if value.kind == "object":
            stop = value.end if value.end is not None else value.at
            start = value.start if self.sent_to is None else self.sent_to
            reader.arguments(reader.text[start:stop])
            self.sent_to = stop
        elif value.end is not None:
            reader.arguments(whole_value_arguments(value.kind, reader.text[value.start:value.end]))
        self.done = value.end is not None


class ObjectCall:
    """A call written as a JSON object, ``{"name": …, "arguments": {…}}`` (or ``"parameters"``):
    its name is sent once its string is complete, then its arguments as they come."""

    def __init__(self, origin: int):
        self.scanner = ObjectScanner(origin)
        self.named = False
        self.args = StreamedArguments()

    def read(self, reader: Reader, final: bool) -> bool:
        """Scan on; True once the object is complete."""
        scanner = self.scanner
        scanner.scan(reader.text, final)
        name = scanner.member("name")
        if not self.named and name is not None and name.value.end is not None:
            if name.value.kind != "string":
                raise Malformed("a call's name is not a string")
            reader.open_call(json.loads(reader.text[name.value.start:name.value.end]))
            self.named = True
        if self.named and (args := scanner.member("arguments", "parameters")) is not None:
            self.args.follow(reader, args.value)
        if scanner.end is None:
            if final:
                raise Malformed("a call cut short")
            return False
        if not self.named:
            raise Malformed("a call without a name")
        if not self.args.done:
            reader.arguments("{}")
        return True


class HermesReader(Reader):
    """``<tool_call>{…}</tool_call>`` blocks, content around them."""

    START, END = "<tool_call>", "</tool_call>"

    def read(self, final: bool) -> None:
        text = self.text
        while True:
            if self.state == "text":
                at = text.find(self.START, self.pos)
                if at < 0:
                    self.say_up_to_marker(self.START, final)
                    return
                self.begin(at)
                self.pos = at + len(self.START)
                self.call, self.state = ObjectCall(self.pos), "call"
            elif self.state == "call":
                if not self.call.read(self, final):
                    return
                self.pos, self.state = self.call.scanner.at, "close"
            else:  # after a call: its closing tag (the end of the reply will do)
                rest = text[self.pos:].lstrip(WHITESPACE)
                if rest.startswith(self.END):
                    self.pos, self.state = len(text) - len(rest) + len(self.END), "text"
                elif final and rest or not final and not self.END.startswith(rest):
                    raise Malformed("no </tool_call> after a call")
                else:
                    return


class Llama3Reader(Reader):
    """Llama 3's JSON calls: ``{"name": …, "parameters": {…}}`` objects separated by ``;``,
    after optional content; ``<|python_tag|>`` anywhere is dropped."""

    TAG = "<|python_tag|>"

    def read(self, final: bool) -> None:
        text = self.text
        while True:
            if self.state == "text":
                brace, tag = text.find("{", self.pos), text.find(self.TAG, self.pos)
                if tag >= 0 and (brace < 0 or tag < brace):
                    self.say(text[self.pos:tag])
                    self.pos = tag + len(self.TAG)
                elif brace >= 0:
                    self.begin(brace)
                    self.call, self.state = ObjectCall(brace), "call"
                else:
                    self.say_up_to_marker(self.TAG, final)
                    return
            elif self.state == "call":
                if not self.call.read(self, final):
                    return
                self.pos, self.state = self.call.scanner.at, "between"
            else:  # between calls: separators, the tag, or the next call
                while self.pos < len(text) and text[self.pos] in WHITESPACE + ";":
                    self.pos += 1
                rest = text[self.pos:]
                if rest.startswith(self.TAG):
                    self.pos += len(self.TAG)
                elif rest.startswith("{"):
                    self.call, self.state = ObjectCall(self.pos), "call"
                elif rest and not (not final and self.TAG.startswith(rest)):
                    raise Malformed("text after the calls")
                else:
                    return


class MistralReader(Reader):
    """``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments"}`` objects (v3 templates), or
    ``name[ARGS]{…}`` per call, each after a ``[TOOL_CALLS]`` (v11+); content before."""

    MARK, ARGS = "[TOOL_CALLS]", "[ARGS]"
    NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")

    def _skip_marks(self, final: bool) -> str | None:
        """Skip whitespace and markers; the rest, or None when it could still be a marker."""
        text = self.text
        while True:
            while self.pos < len(text) and text[self.pos] in WHITESPACE:
                self.pos += 1
            rest = text[self.pos:]
            if rest.startswith(self.MARK):
                self.pos += len(self.MARK)
            elif not final and rest and self.MARK.startswith(rest[:len(self.MARK)]) and len(rest) < len(self.MARK):
                return None
            else:
                return rest

    def read(self, final: bool) -> None:
        text = self.text
        while True:
            state = self.state
            if state == "text":
                at = text.find(self.MARK, self.pos)
                if at < 0:
                    self.say_up_to_marker(self.MARK, final)
                    return
                self.begin(at)
                self.pos, self.state = at + len(self.MARK), "kind"
            elif state in ("kind", "after_list", "named_next"):
                rest = self._skip_marks(final)
                if rest is None:
                    return
                if not rest:
                    if final and (state == "kind" or not self.calls):
                        raise Malformed("no calls after [TOOL_CALLS]")
                    return
                if rest[0] == "[" and state != "named_next":
                    self.pos, self.state = self.pos + 1, "list_first"
                elif rest[0] in self.NAME_CHARS and state != "after_list":
                    self.state = "name"
                else:
                    raise Malformed("no calls after [TOOL_CALLS]")
            elif state in ("list_first", "list_item", "list_next"):
                while self.pos < len(text) and text[self.pos] in WHITESPACE:
                    self.pos += 1
                if self.pos == len(text):
                    if final:
                        raise Malformed("a list of calls cut short")
                    return
                ch = text[self.pos]
                if ch == "{" and state != "list_next":
                    self.call, self.state = ObjectCall(self.pos), "list_call"
                elif ch == "]" and state != "list_item":
                    self.pos, self.state = self.pos + 1, "after_list"
                elif ch == "," and state == "list_next":
                    self.pos, self.state = self.pos + 1, "list_item"
                else:
                    raise Malformed(f"unexpected {ch!r} in the list of calls")
            elif state == "list_call":
                if not self.call.read(self, final):
                    return
                self.pos, self.state = self.call.scanner.at, "list_next"
            elif state == "name":
                end = self.pos
                while end < len(text) and text[end] in self.NAME_CHARS:
                    end += 1
                rest = text[end:]
                if rest.startswith(self.ARGS):
                    self.open_call(text[self.pos:end])
                    self.pos = end + len(self.ARGS)
                    self.value, self.args, self.state = ValueScanner(self.pos), StreamedArguments(), "args"
                elif final or not self.ARGS.startswith(rest):
                    raise Malformed("a call's name without [ARGS]")
                else:
                    return
            else:  # "args": the arguments value after [ARGS]
                self.value.scan(text, final)
                self.args.follow(self, self.value)
                if self.value.end is None:
                    if final:
                        raise Malformed("arguments cut short")
                    return
                self.pos, self.state = self.value.end, "named_next"


def parse_with(reader: Reader, text: str) -> ParsedOutput:
    """A whole reply read by ``reader``: its content and calls, or all content when the markup
    is malformed anywhere (a parser never loses text)."""
    parts = reader.push(text) + reader.finish()
    if reader.failed:
        return ParsedOutput(content=text.strip() or None)
    names: list[str] = []
    arguments: list[str] = []
    for part in parts:
        if part.name is not None:
            names.append(part.name)
            arguments.append("")
        elif part.index >= 0:
            arguments[part.index] += part.arguments
    content = "".join(p.content for p in parts) or None
    return ParsedOutput(content=content, tool_calls=[ParsedToolCall(name=n, arguments=a)
                                                     for n, a in zip(names, arguments)])
