"""``/v1/responses`` (the stateless subset) on SmolLM2 through the official openai client:
string and item input, instructions, max_output_tokens, text.format, function tools and their
results, the streamed event types, and 400s for what needs state."""

from __future__ import annotations

import json

import openai
import pytest
from smol_live import NAME, needs_smollm2, start_smol
from test_tool_calling import HERMES_TEMPLATE, WEATHER

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("flowserve_xgrammar")

pytestmark = needs_smollm2

TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "parameters": WEATHER}


@pytest.fixture(scope="module")
def smol(start_server, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "hermes.jinja"
    template.write_text(HERMES_TEMPLATE)
    return start_smol(start_server, "-o", f"chat_template={template}")


def test_a_plain_response_and_its_usage(smol):
    client = smol.client()
    response = client.responses.create(model=NAME, input="What is the capital of France?",
                                       instructions="Answer in one short sentence.", max_output_tokens=24,
                                       temperature=0)
    assert response.id.startswith("resp_") and response.object == "response" and response.model == NAME
    assert response.output_text and response.status in ("completed", "incomplete")
    [message] = response.output
    assert message.type == "message" and message.role == "assistant"
    assert response.usage.output_tokens <= 24 and response.usage.total_tokens == (
        response.usage.input_tokens + response.usage.output_tokens)
    cut = client.responses.create(model=NAME, input="Tell me a long story.", max_output_tokens=5, temperature=0)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    items = client.responses.create(model=NAME, temperature=0, max_output_tokens=24, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "What is the capital of France?"}]}])
    assert items.output_text == client.responses.create(model=NAME, input="What is the capital of France?",
                                                        max_output_tokens=24, temperature=0).output_text


def test_streamed_events_add_up_to_the_response(smol):
    stream = smol.client().responses.create(model=NAME, input="Name three colours.", max_output_tokens=30,
                                            temperature=0, stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_item.added" in kinds and "response.output_text.done" in kinds
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and events[-1].response.output_text == text


def test_text_format_json_schema_validates(smol):
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    response = smol.client().responses.create(
        model=NAME, input="Describe a person.", max_output_tokens=60, temperature=0.7,
        text={"format": {"type": "json_schema", "name": "person", "schema": person, "strict": True}})
    jsonschema.validate(json.loads(response.output_text), person)


def test_function_tools_and_their_results(smol):
    client = smol.client()
    asked = client.responses.create(model=NAME, input="What is the weather in Paris?", tools=[TOOL],
                                    tool_choice="required", max_output_tokens=80, temperature=0)
    calls = [item for item in asked.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    answered = client.responses.create(model=NAME, tools=[TOOL], max_output_tokens=20, temperature=0, input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "21 degrees and sunny"}])
    assert answered.output_text and answered.output[0].type == "message"
    streamed = client.responses.create(model=NAME, input="Weather in Rome?", tools=[TOOL], max_output_tokens=80,
                                       temperature=0, stream=True,
                                       tool_choice={"type": "function", "name": "get_weather"})
    events = list(streamed)
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments)["unit"] in ("celsius", "fahrenheit")
    assert events[-1].type == "response.completed"


@pytest.mark.parametrize("extra, param", [({"previous_response_id": "resp_1"}, "previous_response_id"),
                                          ({"store": True}, "store"),
                                          ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type")])
def test_state_and_unknown_items_are_400s(smol, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        smol.client().responses.create(model=NAME, **{"input": "Hi", **extra})
    assert caught.value.body["param"] == param
