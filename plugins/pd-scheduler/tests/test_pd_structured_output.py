"""Structured output through the PD schedulers, live (issue 19): the first token is sampled
under the grammar on the prefill instance, the rest on a decode instance, whose matcher must
first be advanced over that token. ``response_format`` ``json_schema`` and a forced tool call
(``tool_choice`` naming a function) validate, streamed and not, on a tiny random Llama (a
random model is the hard case: nothing but the grammar keeps it on the schema)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("flowserve_spmd_executor")
pytest.importorskip("flowserve_xgrammar")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from flowserve_testing import serve, write_tiny_llama  # noqa: E402  (after the importorskip above)

ENGINE = ["--tokenizer", "hf", "--executor", "spmd", "--kv-cache", "paged", "--batch-scheduler", "continuous",
          "--scaler", "static", "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "16MiB"]
PD = {"pd-disaggregated": ["--prefill-instances", "1", "--decode-instances", "1"],
      # every prompt counts as long: the disaggregated path, which is the one under test
      "pd-hybrid": ["--colocated-instances", "1", "--prefill-instances", "1", "--decode-instances", "1",
                    "-o", "hybrid_long_prompt_tokens=1"]}
BOUND = 180

#: Short values only (enums, bounded integers and strings): a random model writes whatever
#: the grammar lets it, and the answer must end within max_tokens. (The name is a pattern, not
#: a maxLength: xgrammar 0.2.9 compiles maxLength strings to characters that admit raw control
#: characters, which a random model writes and JSON forbids.)
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "lang": {"enum": ["en", "fr", "de"]}}, "required": ["name", "age", "lang"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
TEMPLATE = """{%- for message in messages %}<|{{ message.role }}|>{{ message.content or "" }}
{% endfor %}{%- if tools %}<|tools|>{{ tools | tojson }}
{% endif %}{%- if add_generation_prompt %}<|assistant|>{% endif %}"""
ASK = [{"role": "user", "content": "Tell me about someone."}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    path = write_tiny_llama(directory / "model", num_hidden_layers=2, seed=5)
    template = directory / "template.jinja"
    template.write_text(TEMPLATE)
    return path, template


@pytest.mark.parametrize("scheduler", ["pd-disaggregated", "pd-hybrid"])
def test_constrained_answers_validate_when_prefill_and_decode_are_apart(tiny, scheduler):
    path, template = tiny
    with serve("--model", str(path), "--served-model-name", "tiny", *ENGINE, "--job-scheduler", scheduler,
               *PD[scheduler], "-o", f"chat_template={template}", timeout=BOUND) as server:
        wait_ready(server, 3 if scheduler == "pd-hybrid" else 2)  # pd-hybrid takes the colocated path until then
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=BOUND)
        schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
        for seed in range(3):
            answer = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=60, temperature=1.0,
                                                    seed=seed, response_format=schema)
            choice = answer.choices[0]
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), PERSON)
        streamed = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=60, temperature=0,
                                                  response_format=schema, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        jsonschema.validate(json.loads(text), PERSON)
        named = {"type": "function", "function": {"name": "get_weather"}}
        for seed in range(2):
            called = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=named,
                                                    max_tokens=60, temperature=1.0, seed=seed)
            choice = called.choices[0]
            [call] = choice.message.tool_calls
            assert choice.finish_reason == "tool_calls" and call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments), WEATHER)
        # one call (a random model left free to add list items may not end the list in time)
        required = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                                  parallel_tool_calls=False, max_tokens=120, temperature=0.8, seed=7)
        choice = required.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        [call] = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)
        metrics = httpx.get(server.url + "/metrics", timeout=10).text  # the KV moved: prefill and decode were apart
        assert float(metrics.split('flowserve:kv_transfer_bytes_total{model_name="tiny"} ')[1].split()[0]) > 0


def wait_ready(server, count: int) -> None:
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        states = [i["state"] for i in httpx.get(server.url + "/admin/status", timeout=10).json()["instances"]]
        if states.count("ready") >= count:
            return
        time.sleep(0.2)
    pytest.fail(f"{count} instances not ready:\n{server.log()[-3000:]}")
