"""The three parsers on the markup their model families write (from the families' chat
templates), through the registered components: content kept, calls split out, malformed calls
left as content."""

from __future__ import annotations

import json

import pytest

from flowserve_core.plugins import PluginManager
from flowserve_core.tool_calls import ParsedToolCall, ToolCallParser
from flowserve_core.types import DeploymentSpec


@pytest.fixture(scope="module")
def parsers():
    manager = PluginManager()
    return {name: manager.build("tool_parser", name, DeploymentSpec()) for name in ("hermes", "llama3_json", "mistral")}


def calls(*pairs):
    return [ParsedToolCall(name=n, arguments=json.dumps(a)) for n, a in pairs]


def test_they_are_tool_call_parsers(parsers):
    assert all(isinstance(p, ToolCallParser) for p in parsers.values())


def test_hermes(parsers):
    hermes = parsers["hermes"]
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    parsed = hermes.parse(text)
    assert parsed.content == "Let me check."
    assert parsed.tool_calls == calls(("get_weather", {"city": "Paris"}), ("get_time", {}))
    cut = hermes.parse('<tool_call>\n{"name": "f", "arguments": {"x": 1}}')  # no closing tag: ended by EOS
    assert cut.content is None and cut.tool_calls == calls(("f", {"x": 1}))
    assert hermes.parse("No tools needed.").content == "No tools needed."
    around = hermes.parse('Checking.\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\nDone.')
    assert around.content == "Checking.\n\nDone." and around.tool_calls == calls(("f", {}))
    broken = '<tool_call>{"name": "f", "arguments": {"x": </tool_call>'
    assert hermes.parse(broken).content == broken and not hermes.parse(broken).tool_calls


def test_llama3_json(parsers):
    llama = parsers["llama3_json"]
    parsed = llama.parse('<|python_tag|>{"name": "a", "parameters": {"q": "x"}}; {"name": "b", "parameters": {}}')
    assert parsed.content is None and parsed.tool_calls == calls(("a", {"q": "x"}), ("b", {}))
    assert llama.parse('{"name": "a", "arguments": {"n": 2}}').tool_calls == calls(("a", {"n": 2}))
    plain = "Sets look like {1, 2} in maths."
    assert llama.parse(plain).content == plain and not llama.parse(plain).tool_calls


def test_mistral(parsers):
    mistral = parsers["mistral"]
    parsed = mistral.parse('[TOOL_CALLS] [{"name": "a", "arguments": {"k": [1, 2]}}, {"name": "b", "arguments": {}}]')
    assert parsed.content is None and parsed.tool_calls == calls(("a", {"k": [1, 2]}), ("b", {}))
    newer = mistral.parse('Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]now[ARGS]{}')
    assert newer.content == "Sure." and newer.tool_calls == calls(("get_weather", {"city": "Rome"}), ("now", {}))
    assert mistral.parse("[TOOL_CALLS] oops").content == "[TOOL_CALLS] oops"
