"""Multi-step decoding (``--decode-steps``) through the API: events of several tokens come out
as the same text, usage and logprobs as one token a step, and a stop string inside such an
event ends the output at the token that completed it. (Toy engine with the ``continuous``
scheduler, which plans the steps; the counter executor samples them.)"""

from __future__ import annotations

import json

import httpx
import pytest
from openai_live import MODEL, sse_events, toy_only


@pytest.fixture(scope="module")
def multi_step_server(start_server, serve_command):
    return start_server(serve_command("--batch-scheduler", "continuous", "--kv-cache", "paged",
                                      "-o", "num_blocks=4096", "--decode-steps", "4"))


@toy_only
def test_several_tokens_a_step_give_the_same_text_usage_and_logprobs(multi_step_server):
    completion = multi_step_server.client().completions.create(model=MODEL, prompt="t5", max_tokens=10, logprobs=1)
    choice = completion.choices[0]
    assert choice.text == "".join(f" t{n}" for n in range(6, 16)) and choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 10
    assert choice.logprobs.tokens == [f" t{n}" for n in range(6, 16)]


@toy_only
def test_a_stream_carries_several_tokens_a_chunk(multi_step_server):
    with httpx.stream("POST", multi_step_server.base_url + "/completions", timeout=30, json={
            "model": MODEL, "prompt": "t5", "max_tokens": 10, "stream": True,
            "stream_options": {"include_usage": True}}) as response:
        events = sse_events(response.read().decode())
    chunks = [json.loads(e) for e in events[:-1]]
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(texts) == "".join(f" t{n}" for n in range(6, 16))
    assert len(texts) < 10  # the first token alone, then four a step
    assert chunks[-1]["usage"]["completion_tokens"] == 10


@toy_only
def test_a_stop_string_inside_a_step_ends_at_the_token_that_completed_it(multi_step_server):
    client = multi_step_server.client()
    # " t9" is the 4th token, in the middle of the step that samples t7..t10
    stopped = client.completions.create(model=MODEL, prompt="t5", max_tokens=200, stop=" t9", logprobs=1)
    choice = stopped.choices[0]
    assert (choice.text, choice.finish_reason) == (" t6 t7 t8", "stop")
    assert stopped.usage.completion_tokens == 4
    assert choice.logprobs.tokens == [" t6", " t7", " t8", " t9"]
    kept = client.completions.create(model=MODEL, prompt="t5", max_tokens=200, stop=[" t9"],
                                     extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == " t6 t7 t8 t9" and kept.usage.completion_tokens == 4


@toy_only
def test_a_stop_token_ends_the_step_and_the_choice(multi_step_server):
    completion = multi_step_server.client().completions.create(
        model=MODEL, prompt="t5", max_tokens=50, extra_body={"stop_token_ids": [12]})
    assert (completion.choices[0].finish_reason, completion.usage.completion_tokens) == ("stop", 7)
