"""The parsers' streaming readers against their own ``parse``: every reply split at every point
(and token-like pieces: one character at a time, and pieces of varying sizes) gives the same
content and calls, each call announced once (index, name) before its argument fragments, and
the fragments joined are exactly the arguments of the whole reply."""

from __future__ import annotations

import json
import random

import pytest

from flowserve_core.plugins import PluginManager
from flowserve_core.tool_calls import ReadsSpecialTokens, StreamsToolCalls, ToolCallParser, ToolCallStream
from flowserve_core.types import DeploymentSpec

WELL_FORMED = {
    "hermes": [
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        '<tool_call>{"name":"f","arguments":{"x":[1,{"y":"}]\\"{"}],"z":null,"w":-1.5e3}}</tool_call>',
        'Checking.\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\nDone.',
        '<tool_call>\n{"arguments": {"q": "late name"}, "name": "search"}\n</tool_call>',
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
        '<tool_call>{"name": "f", "parameters": {"a": "é ☃ <tool_call>"}}</tool_call> and after',
        '<tool_call>{"name": "f"}</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {"x": 1}}',  # cut short by EOS: no closing tag
        "No tools needed, < and <tool are just text.",
    ],
    "llama3_json": [
        '<|python_tag|>{"name": "a", "parameters": {"q": "x"}}; {"name": "b", "parameters": {}}',
        'Here you go: {"name": "a", "arguments": {"n": 2, "list": [1, 2, {"k": "v"}]}}',
        '{"name": "get_weather", "parameters": {"city": "Rome"}}\n;\n{"name": "t", "parameters": null}',
        "Plain text with <|python_tag and no calls.",
    ],
    "mistral": [
        '[TOOL_CALLS] [{"name": "a", "arguments": {"k": [1, 2]}}, {"name": "b", "arguments": {}}]',
        'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]now[ARGS]{}',
        '[TOOL_CALLS][{"name": "a", "arguments": {"s": "[TOOL_CALLS] inside"}}] [TOOL_CALLS] [{"name": "b", '
        '"arguments": {"t": true}}]',
        "Text only, with [brackets] and [TOOL_ but no calls.",
    ],
}
MALFORMED = {
    "hermes": ['<tool_call>{"name": "f", "arguments": {"x": </tool_call>', "A <tool_call>not json</tool_call>",
               '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
               '<tool_call>{"name": "f", "arguments": {}}</tool_cal'],
    "llama3_json": ["Sets look like {1, 2} in maths.", '{"answer": 5}', '{"name": "a", "parameters": {"x": 1'],
    "mistral": ["[TOOL_CALLS] oops", "[TOOL_CALLS]", '[TOOL_CALLS] [{"name": "a", "arguments": {}}', "[TOOL_CALLS][]"],
}


@pytest.fixture(scope="module")
def parsers():
    manager = PluginManager()
    return {name: manager.build("tool_parser", name, DeploymentSpec()) for name in WELL_FORMED}


def read(parser, pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """Feed ``pieces`` through a stream: the content joined and the calls (name, arguments),
    checking the order of the pieces as a client sees them."""
    stream = parser.stream()
    assert isinstance(stream, ToolCallStream)
    parts = [part for piece in pieces for part in stream.push(piece)] + stream.finish()
    content, calls = "", []
    for part in parts:
        if part.content:
            assert part.index == -1 and part.name is None and not part.arguments
            content += part.content
        elif part.name is not None:  # a call starts: the next index, announced once
            assert part.index == len(calls) and not part.arguments
            calls.append([part.name, ""])
        else:
            assert part.index == len(calls) - 1 and part.arguments, part  # the current call's arguments
            calls[-1][1] += part.arguments
    return content, [(name, arguments) for name, arguments in calls]


def splits(text: str) -> list[list[str]]:
    """The text in two at every point, one character at a time, and in random pieces."""
    rng = random.Random(len(text))
    out = [[text[:at], text[at:]] for at in range(len(text) + 1)]
    out.append(list(text))
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return out


def test_the_parsers_stream_and_mistrals_reads_special_tokens(parsers):
    assert all(isinstance(p, ToolCallParser) and isinstance(p, StreamsToolCalls) for p in parsers.values())
    assert isinstance(parsers["mistral"], ReadsSpecialTokens) and not isinstance(parsers["hermes"], ReadsSpecialTokens)


@pytest.mark.parametrize("name, text", [(n, t) for n, texts in WELL_FORMED.items() for t in texts])
def test_every_split_gives_the_whole_replys_content_and_calls(parsers, name, text):
    parser = parsers[name]
    whole = parser.parse(text)
    expected = (whole.content or "", [(c.name, c.arguments) for c in whole.tool_calls])
    for arguments in expected[1]:
        assert isinstance(json.loads(arguments[1]), dict)
    for pieces in splits(text):
        assert read(parser, pieces) == expected, pieces


@pytest.mark.parametrize("name, text", [(n, t) for n, texts in MALFORMED.items() for t in texts])
def test_malformed_markup_stays_content_unless_a_call_was_already_sent(parsers, name, text):
    parser = parsers[name]
    whole = parser.parse(text)
    assert whole.content == text.strip() and not whole.tool_calls
    for pieces in splits(text):
        content, calls = read(parser, pieces)
        if not calls:  # nothing was announced as a call: all of it is content, as parse says
            assert content == text.strip(), pieces
        else:  # a call was announced before the markup broke: what was sent stands, the rest is content
            assert all(name and arguments in text for name, arguments in calls), pieces
            assert content in text, pieces


def test_arguments_stream_as_the_model_writes_them(parsers):
    stream = parsers["hermes"].stream()
    assert stream.push("I'll look.<tool") == [stream_part(content="I'll look.")]
    assert stream.push('_call>{"name": "get_wea') == []
    assert stream.push('ther", "argu') == [stream_part(index=0, name="get_weather")]
    assert stream.push('ments": {"city": "Par') == [stream_part(index=0, arguments='{"city": "Par')]
    assert stream.push('is"}}</tool_call>') == [stream_part(index=0, arguments='is"}')]
    assert stream.finish() == []


def stream_part(**fields):
    from flowserve_core.tool_calls import ToolCallPart

    return ToolCallPart(**fields)


# ------------------------------------------------------------------ generated replies

from hypothesis import given, settings, strategies as st  # noqa: E402  (this section's own imports)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"), max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
arguments = st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=6), json_values, max_size=4)
layouts = st.sampled_from([dict(), dict(separators=(",", ":")), dict(indent=1), dict(ensure_ascii=False)])
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)
contents = st.text(st.sampled_from(list("ab .,!\n") + ["é", "<", "[", "}"]), max_size=12)


def markup(parser: str, content: str, calls: list[tuple[str, str]]) -> str:
    """A reply in ``parser``'s markup: ``content`` (kept free of what would start a call there),
    then ``calls`` with their arguments' JSON text as given."""
    if parser == "hermes":
        return content + "".join(f'<tool_call>\n{{"name": {json.dumps(n)}, "arguments": {a}}}\n</tool_call>\n'
                                 for n, a in calls)
    if parser == "llama3_json":
        return content.replace("{", "(").replace("<", "(") + "<|python_tag|>" + "; ".join(
            f'{{"name": {json.dumps(n)}, "parameters": {a}}}' for n, a in calls)
    return content.replace("[", "(") + "[TOOL_CALLS][" + ", ".join(
        f'{{"name": {json.dumps(n)}, "arguments": {a}}}' for n, a in calls) + "]"


@settings(max_examples=150, deadline=None)
@given(parser=st.sampled_from(list(WELL_FORMED)), content=contents,
       calls=st.lists(st.tuples(names, arguments, layouts), min_size=1, max_size=3), data=st.data())
def test_generated_calls_stream_their_arguments_exactly_as_written(parsers, parser, content, calls, data):
    written = [(name, json.dumps(args, **layout)) for name, args, layout in calls]
    text = markup(parser, content, written)
    whole = parsers[parser].parse(text)
    assert [(c.name, c.arguments) for c in whole.tool_calls] == written, text
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(text)), max_size=12))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert read(parsers[parser], pieces) == (whole.content or "", written)
