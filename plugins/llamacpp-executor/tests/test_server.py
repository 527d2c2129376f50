"""``flowserve serve --executor llamacpp`` on SmolLM2, talked to by the official ``openai``
client: instances are real worker processes (scaler ``static``), FlowServe's schedulers,
sampler and frontend run as with ``spmd``."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import httpx
import pytest

from flowserve_testing.live import LiveServer

openai = pytest.importorskip("openai")

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def server(smollm2):
    live = LiveServer("--model", str(smollm2), "--served-model-name", "smollm2", "--executor", "llamacpp",
                      "--kv-cache-memory", "256MiB").start(timeout=180)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120)


def metric(server: LiveServer, name: str, **labels: str) -> float:
    """One sample of ``/metrics`` (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_metric(server: LiveServer, name: str, wanted: float, timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    while (value := metric(server, name)) != wanted and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def test_greedy_chat_streamed_equals_non_streamed_and_knows_paris(client):
    whole = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert "Paris" in text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices_seeds_and_logprobs(client):
    params = dict(model="smollm2", messages=QUESTION, max_tokens=12, temperature=1.0, top_p=0.95)
    first = client.chat.completions.create(**params, seed=42, n=2)
    again = client.chat.completions.create(**params, seed=42, n=2)
    assert len(first.choices) == 2
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    scored = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=3)
    content = scored.choices[0].logprobs.content
    assert len(content) == scored.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)  # greedy took the best


def test_stop_strings_cut_the_text(client):
    whole = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=16,
                                      temperature=0).choices[0].text
    word = whole.split()[1]
    cut = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=16,
                                    temperature=0, stop=[word]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == whole[:whole.index(word)]


def test_a_client_that_disconnects_mid_stream_aborts_its_request(server):
    aborted = metric(server, "flowserve:request_success_total", finished_reason="abort")
    body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            received = 0
            while received < 3:
                if next(lines).startswith("data: "):
                    received += 1
            assert metric(server, "flowserve:num_requests_running") == 1
    assert wait_metric(server, "flowserve:num_requests_running", 0) == 0
    deadline = time.monotonic() + 30
    while metric(server, "flowserve:request_success_total", finished_reason="abort") != aborted + 1:
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.1)


def test_an_instance_killed_mid_stream_fails_its_request_clearly_and_is_replaced(server, client):
    body = {"model": "smollm2", "prompt": "Count to one hundred:", "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            received = []
            while len(received) < 3:
                if (line := next(lines)).startswith("data: "):
                    received.append(line)
            os.kill(_instance_pid(server), signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
    errors = [json.loads(line[6:]) for line in rest if line != "data: [DONE]" and "error" in line]
    assert errors and "instance" in json.dumps(errors[-1]).lower()
    deadline = time.monotonic() + 120
    while True:  # the scaler replaces the instance; the deployment serves again
        try:
            reply = client.completions.create(model="smollm2", prompt="Hello", max_tokens=4, temperature=0)
            break
        except openai.APIStatusError:
            assert time.monotonic() < deadline, "the killed instance was not replaced"
            time.sleep(0.5)
    assert reply.choices[0].text


def _instance_pid(server: LiveServer) -> int:
    with urllib.request.urlopen(server.url + "/admin/status", timeout=10) as reply:
        status = json.loads(reply.read())
    pids = [i["pid"] for i in status["instances"] if i["state"] == "ready" and i.get("pid")]
    assert pids, status
    return pids[0]


def test_structured_output_and_logit_bias_work_through_the_shared_sampler(server, client):
    """Issue 19: the token masks and biases are the sampler's, so llama.cpp's logits obey them too."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("flowserve_xgrammar")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer", "minimum": 0, "maximum": 10**9}},
              "required": ["city", "population"], "additionalProperties": False}
    chat = client.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=60, temperature=0.8, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
    assert chat.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(chat.choices[0].message.content), schema)
    choice = client.completions.create(model="smollm2", prompt="The best season is", max_tokens=5, temperature=1.0,
                                       extra_body={"guided_choice": ["spring", "autumn"]})
    assert choice.choices[0].text in ("spring", "autumn")
    [zebra] = httpx.post(server.url + "/tokenize", json={"prompt": " zebra", "add_special_tokens": False},
                         timeout=30).json()["tokens"]
    forced = client.completions.create(model="smollm2", prompt="One, two,", max_tokens=3, temperature=0,
                                       logit_bias={str(zebra): 100})
    assert forced.choices[0].text == " zebra" * 3


def test_echo_scores_the_prompt_as_llama_cpp_does(server, client, smollm2):
    from flowserve_llamacpp_executor.testing import llama_cpp_prompt_logprobs

    text = "The quick brown fox jumps over the lazy dog, and then it runs into the forest to hide."
    prompt = httpx.post(server.url + "/tokenize", json={"model": "smollm2", "prompt": text},
                        timeout=30).json()["tokens"]
    answer = client.completions.create(model="smollm2", prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                       extra_body={"prompt_logprobs": 1})
    choice = answer.choices[0]
    assert answer.usage.prompt_tokens == len(prompt) and answer.usage.completion_tokens == 0
    assert choice.text == "".join(choice.logprobs.tokens) and len(choice.logprobs.tokens) == len(prompt)
    scored = choice.model_extra["prompt_logprobs"]
    assert choice.logprobs.token_logprobs[0] is None and scored[0] is None
    expected = llama_cpp_prompt_logprobs(smollm2, prompt)  # Q4_1: ggml's rounding differs a little by batch
    for i in range(1, len(prompt)):
        assert choice.logprobs.token_logprobs[i] == pytest.approx(expected[i - 1, prompt[i]], abs=0.02)
        assert scored[i][str(prompt[i])]["logprob"] == pytest.approx(choice.logprobs.token_logprobs[i], abs=1e-6)
