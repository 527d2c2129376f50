"""``tool_choice: "required"`` replies streamed as they are written: the JSON list of
``{"name", "parameters"}`` that structured output makes the model write, fed to a chat's
``ToolStream`` split at every character boundary (and character by character), gives each call's
index, id, type and name once its name is complete, then the raw text of its ``parameters`` as
fragments that join into exactly the unstreamed answer's ``arguments``."""

from __future__ import annotations

import json

import pytest
from msgspec import UnsetType

from flowserve_openai.required_calls import RequiredCallsReader, calls_of
from flowserve_openai.tools import ToolPlan, ToolStream, read_reply

#: Replies as xgrammar writes them (json.dumps spacing) and as "any whitespace" may.
REPLIES = {
    "one call": '[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}]',
    "two calls": ('[{"name": "get_weather", "parameters": {"city": "Rome", "unit": "fahrenheit"}}, '
                  '{"name": "get_time", "parameters": {"zone": "CET"}}]'),
    "awkward strings": ('[{"name": "say", "parameters": {"text": "a \\"quoted\\" } ] {, \\\\ \\u00e9 é \\n", '
                        '"n": -1.5e3, "ok": true, "none": null, "list": [1, {"b": []}, "]"]}}]'),
    "escaped name": '[{"name": "we\\u0069rd \\"one\\"", "parameters": {}}]',
    "any whitespace": '\n [\n  {\n   "name" :\t"get_time" ,\n   "parameters" : {\n "zone" : "UTC"\n }\n  }\n ]\n',
    "parameters first": '[{"parameters": {"zone": "UTC"}, "name": "get_time"}, {"name": "f", "parameters": {}}]',
}


def splits(text: str):
    yield [text]
    for at in range(1, len(text)):
        yield [text[:at], text[at:]]
    yield list(text)


def streamed(pieces: list[str], parallel: bool = True) -> tuple[str, list[dict], bool]:
    """The content, calls (checking the deltas' shapes) and called flag of a streamed reply."""
    stream = ToolStream(ToolPlan("required", parallel=parallel))
    deltas = [delta for piece in pieces for delta in stream.push(piece)]
    more, called = stream.finish()
    content, calls = "", []
    for delta in deltas + more:
        content += delta.content if isinstance(delta.content, str) else ""
        for part in delta.tool_calls if not isinstance(delta.tool_calls, UnsetType) else []:
            if isinstance(part.id, str):
                assert part.index == len(calls) and part.type == "function" and isinstance(part.function.name, str)
                assert part.id.startswith("call_")
                calls.append({"name": part.function.name, "arguments": ""})
            else:
                assert part.index == len(calls) - 1 and isinstance(part.function.name, UnsetType)
            arguments = part.function.arguments
            calls[part.index]["arguments"] += arguments if isinstance(arguments, str) else ""
    return content, calls, called


@pytest.mark.parametrize("reply", REPLIES)
def test_streamed_at_every_split_the_calls_are_the_unstreamed_ones(reply):
    text = REPLIES[reply]
    whole = read_reply(ToolPlan("required"), text)
    assert whole.content is None and whole.tool_calls
    expected = [{"name": call.name, "arguments": call.arguments} for call in whole.tool_calls]
    # the arguments are the parameters' JSON text as written
    decoded = json.loads(text)
    assert [json.loads(call["arguments"]) for call in expected] == [call["parameters"] for call in decoded]
    assert [call["name"] for call in expected] == [call["name"] for call in decoded]
    for pieces in splits(text):
        content, calls, called = streamed(pieces)
        assert (content, calls, called) == ("", expected, True), pieces


def test_a_call_is_announced_when_its_name_is_complete_and_its_arguments_come_as_written():
    reader = RequiredCallsReader()
    assert reader.push('[{"name": "get_wea') == []
    parts = reader.push('ther", "parameters": {"ci')
    assert [(p.index, p.name, p.arguments) for p in parts] == [(0, "get_weather", ""), (0, None, '{"ci')]
    assert [p.arguments for p in reader.push('ty": "Paris"')] == ['ty": "Paris"']
    parts = reader.push('}}, {"name": "get_time"')
    assert [(p.index, p.name, p.arguments) for p in parts] == [(0, None, "}"), (1, "get_time", "")]
    assert reader.finish() == [] and not reader.complete


def test_with_parallel_calls_off_only_the_first_is_streamed():
    text = REPLIES["two calls"]
    content, calls, called = streamed(list(text), parallel=False)
    assert [call["name"] for call in calls] == ["get_weather"] and called and content == ""
    assert [call.name for call in read_reply(ToolPlan("required", parallel=False), text).tool_calls] == ["get_weather"]


@pytest.mark.parametrize("cut", [1, 5, 12])
def test_a_reply_cut_before_any_name_comes_as_content(cut):
    text = REPLIES["one call"][:cut]
    assert read_reply(ToolPlan("required"), text).content == text
    content, calls, called = streamed(list(text))
    assert (content, calls, called) == (text, [], False)


def test_a_reply_cut_inside_a_call_keeps_what_was_streamed():
    text = REPLIES["two calls"][:REPLIES["two calls"].index('CET"')]
    assert calls_of(text) is None and read_reply(ToolPlan("required"), text).content == text
    content, calls, called = streamed(list(text))
    assert called and content == "" and [c["name"] for c in calls] == ["get_weather", "get_time"]
    assert calls[0]["arguments"] == '{"city": "Rome", "unit": "fahrenheit"}'


@pytest.mark.parametrize("text", ['{"name": "f"}', '[{"name": 3, "parameters": {}}]',
                                  '[{"parameters": {}}]', '[{"name": "f", "parameters": {}}] x'])
def test_what_is_not_a_list_of_calls_stays_text(text):
    assert calls_of(text) is None
    assert read_reply(ToolPlan("required"), text).content == text
