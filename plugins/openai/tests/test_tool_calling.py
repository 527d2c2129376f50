"""Tool calling on SmolLM2 (spmd executor, shared sampler) through the official openai client:
``required`` and a named function enforced by structured output (arguments valid for the
function's schema, streamed and not), ``parallel_tool_calls``, tools and tool turns rendered by
the chat template (here a Hermes-style one given with the ``chat_template`` option, so the
``hermes`` parser is detected from it), and ``auto`` replies parsed into ``tool_calls``."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from smol_live import NAME, needs_smollm2, start_smol

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("flowserve_xgrammar")
pytest.importorskip("flowserve_tool_parsers")

pytestmark = needs_smollm2

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 16}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a zone.",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]

HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
You may call these tools:
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def smol(start_server, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "hermes.jinja"
    template.write_text(HERMES_TEMPLATE)
    return start_smol(start_server, "-o", f"chat_template={template}")


def valid(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_and_named_calls_are_valid_for_their_schemas(smol):
    client = smol.client()
    required = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, tool_choice="required",
                                              max_tokens=150, temperature=0.7, seed=1)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls and all(valid(c) is None for c in choice.message.tool_calls)
    named = client.chat.completions.create(
        model=NAME, messages=ASK, tools=TOOLS, max_tokens=80, temperature=1.0, seed=2, n=2,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    for choice in named.choices:
        [call] = choice.message.tool_calls
        assert call.function.name == "get_time" and choice.finish_reason == "tool_calls"
        valid(call)
    single = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=150, temperature=1.0, seed=3)
    assert len(single.choices[0].message.tool_calls) == 1


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_calls_come_as_openai_deltas(smol, tool_choice):
    stream = smol.client().chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, tool_choice=tool_choice,
                                                   max_tokens=150, temperature=0, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:  # the first part of a call: its id, type and name
                    assert delta.id and delta.type == "function" and delta.function.name
                    calls[delta.index] = {"name": delta.function.name, "arguments": ""}
                else:
                    assert delta.id is None and delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls" and calls
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_required_calls_stream_as_written_and_join_into_the_unstreamed_answer(smol):
    client = smol.client()
    ask = dict(model=NAME, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=150, temperature=0)
    whole = client.chat.completions.create(**ask).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.tool_calls
    calls: list[dict] = []
    finish, fragments = None, 0
    for chunk in client.chat.completions.create(stream=True, **ask):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            assert not choice.delta.content
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:  # a call's first delta: the next index, its id, type and name
                    assert delta.index == len(calls) and delta.type == "function" and delta.function.name
                    calls.append({"name": delta.function.name, "arguments": ""})
                else:
                    assert delta.index == len(calls) - 1 and delta.function.name is None
                    fragments += 1
                calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls"
    assert calls == [{"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls]
    assert fragments > len(calls)  # the arguments came as the tokens did, not whole at the end
    # /v1/responses streams them the same way: an item per call, then its arguments' deltas
    tools = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
             for t in TOOLS]
    asked = dict(model=NAME, input=ASK[0]["content"], tools=tools, tool_choice="required", max_output_tokens=150,
                 temperature=0)
    response = client.responses.create(**asked)
    events = list(client.responses.create(stream=True, **asked))
    added = [e.item for e in events if e.type == "response.output_item.added"]
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert [item.name for item in added] == [item.name for item in response.output] and added
    assert ["".join(e.delta for e in deltas if e.output_index == index) for index in range(len(added))] == [
        item.arguments for item in response.output]
    assert len(deltas) > len(added) and events[-1].type == "response.completed"


AUTO_CALL = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "unit": "celsius"\}\}</tool_call>'


def test_auto_replies_are_parsed_by_the_parser_detected_from_the_template(smol):
    client = smol.client()
    # the model is held to Hermes markup (guided_regex), as a tool-trained model writes it unasked
    called = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0.5,
                                            seed=4, extra_body={"guided_regex": r"Let me check\. " + AUTO_CALL})
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["unit"] == "celsius"
    stream = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0.5,
                                            seed=4, stream=True, extra_body={"guided_regex": r"Let me check\. " + AUTO_CALL})
    content, parts, finish = "", [], None
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            parts += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert content.strip() == "Let me check." and "<tool_call>" not in content and finish == "tool_calls"
    assert parts[0].function.name == "get_weather"
    assert json.loads("".join(p.function.arguments or "" for p in parts)) == json.loads(call.function.arguments)
    plain = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, max_tokens=8, temperature=0)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content


def test_tool_turns_and_tools_are_rendered_by_the_template(smol):
    conversation = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                         "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"}]
    tokens = httpx.post(smol.url + "/tokenize", json={"model": NAME, "messages": conversation, "tools": TOOLS},
                        timeout=30).json()["tokens"]
    text = httpx.post(smol.url + "/detokenize", json={"model": NAME, "tokens": tokens}, timeout=30).json()["prompt"]
    assert '"name": "get_time"' in text  # the tools, as the template prints them
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>' in text
    assert "<tool_response>21 degrees and sunny</tool_response>" in text
    answer = smol.client().chat.completions.create(model=NAME, messages=conversation, tools=TOOLS, max_tokens=20,
                                                   temperature=0)
    assert answer.usage.prompt_tokens == len(tokens) and answer.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}],
      "tool_choice": "required"}, "tools"),
])
def test_bad_tool_requests_are_400s(smol, body, param):
    r = httpx.post(smol.base_url + "/chat/completions", timeout=60,
                   json={"model": NAME, "messages": ASK, "tools": TOOLS, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_the_openai_client_raises_bad_request_for_an_unknown_named_tool(smol):
    with pytest.raises(openai.BadRequestError):
        smol.client().chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, max_tokens=5,
                                              tool_choice={"type": "function", "function": {"name": "missing"}})
