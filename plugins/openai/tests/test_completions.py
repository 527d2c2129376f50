"""/v1/completions through the official openai client against a live server."""

from __future__ import annotations

import json
import math

import httpx
from openai_live import MODEL, recorded_params, sse_events, toy_only, unique_prompt


@toy_only
def test_completion_text_usage_and_openai_fields(toy_server):
    client = toy_server.client()
    completion = client.completions.create(model=MODEL, prompt="t5 t6", max_tokens=5)
    assert completion.id.startswith("cmpl-") and completion.object == "text_completion"
    assert isinstance(completion.created, int) and completion.model == MODEL
    assert completion.system_fingerprint.startswith("fp_")
    [choice] = completion.choices
    assert (choice.index, choice.text, choice.finish_reason) == (0, " t7 t8 t9 t10 t11", "length")
    assert choice.logprobs is None
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (2, 5, 7)


@toy_only
def test_prompt_as_strings_token_ids_and_lists_of_token_ids(toy_server):
    client = toy_server.client()

    def texts(completion):
        return [choice.text for choice in sorted(completion.choices, key=lambda ch: ch.index)]

    assert texts(client.completions.create(model=MODEL, prompt=["t5", "t20 t21"], max_tokens=2)) == \
        [" t6 t7", " t22 t23"]
    assert texts(client.completions.create(model=MODEL, prompt=[5, 6], max_tokens=2)) == [" t7 t8"]
    both = client.completions.create(model=MODEL, prompt=[[5], [30, 31]], max_tokens=2)
    assert texts(both) == [" t6 t7", " t32 t33"]
    assert (both.usage.prompt_tokens, both.usage.completion_tokens) == (3, 4)


def test_streaming_gives_the_same_text_and_usage_in_a_last_chunk(toy_server):
    client = toy_server.client()
    whole = client.completions.create(model=MODEL, prompt="t40 t41", max_tokens=6, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="t40 t41", max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    *content, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 6 and last.usage.total_tokens == 8
    assert all(chunk.usage is None for chunk in content)
    assert "".join(c.choices[0].text for c in content) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in content][-1] == "length"
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("cmpl-")
    # without include_usage no chunk carries usage
    plain = list(client.completions.create(model=MODEL, prompt="t40 t41", max_tokens=2, stream=True))
    assert all(chunk.usage is None and len(chunk.choices) == 1 for chunk in plain)


@toy_only
def test_echo_prepends_the_prompt(toy_server):
    client = toy_server.client()
    completion = client.completions.create(model=MODEL, prompt="t5 t6", max_tokens=2, echo=True)
    assert completion.choices[0].text == "t5 t6 t7 t8"
    streamed = client.completions.create(model=MODEL, prompt=[5, 6], max_tokens=2, echo=True, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == " t5 t6 t7 t8"


def test_legacy_logprobs_shape(toy_server):
    client = toy_server.client()
    completion = client.completions.create(model=MODEL, prompt="t50", max_tokens=4, logprobs=2)
    choice = completion.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == \
        len(logprobs.text_offset) == completion.usage.completion_tokens == 4
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    assert all(isinstance(lp, float) and lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) == 2 and logprobs.tokens[i] in top for i, top in enumerate(logprobs.top_logprobs))
    streamed = list(client.completions.create(model=MODEL, prompt="t50", max_tokens=4, logprobs=2, stream=True))
    tokens = [t for chunk in streamed for t in chunk.choices[0].logprobs.tokens]
    offsets = [o for chunk in streamed for o in chunk.choices[0].logprobs.text_offset]
    assert tokens == logprobs.tokens and offsets == logprobs.text_offset


@toy_only
def test_toy_logprobs_values(toy_server):
    completion = toy_server.client().completions.create(model=MODEL, prompt="t60", max_tokens=1, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens == [" t61"] and math.isclose(logprobs.token_logprobs[0], -math.log(2))
    assert logprobs.top_logprobs[0] == {" t61": -math.log(2), " t62": -2 * math.log(2)}


@toy_only
def test_n_choices_fan_out_with_seeds_offset_per_choice(toy_server, record_path):
    text, ids = unique_prompt(1)
    completion = toy_server.client().completions.create(model=MODEL, prompt=text, max_tokens=3, n=3, seed=41)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert len({c.text for c in completion.choices}) == 1  # the toy is deterministic
    assert completion.usage.prompt_tokens == len(ids) and completion.usage.completion_tokens == 9
    assert sorted(p["seed"] for p in recorded_params(record_path, ids)) == [41, 42, 43]


@toy_only
def test_sampling_parameters_reach_the_engine(toy_server, record_path):
    text, ids = unique_prompt(2)
    toy_server.client().completions.create(
        model=MODEL, prompt=text, max_tokens=7, temperature=0.7, top_p=0.9, seed=5, stop=["zz", "yy"],
        presence_penalty=0.5, frequency_penalty=-0.5, user="alice", logprobs=3, logit_bias={"17": 2.5, "3": -100},
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "stop_token_ids": [998],
                    "include_stop_str_in_output": True, "ignore_eos": True, "min_tokens": 2,
                    "skip_special_tokens": False, "prompt_logprobs": 2})
    [params] = recorded_params(record_path, ids)
    assert params == {
        "max_tokens": 7, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "seed": 5,
        "stop": ["zz", "yy"], "stop_token_ids": [998], "include_stop_str_in_output": True, "ignore_eos": True,
        "min_tokens": 2, "logprobs": 3, "prompt_logprobs": 2, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "repetition_penalty": 1.2, "skip_special_tokens": False, "logit_bias": {"17": 2.5, "3": -100.0},
        "structured_output": None}
    text, ids = unique_prompt(3)
    toy_server.client().completions.create(model=MODEL, prompt=text, stop="single")
    [defaults] = recorded_params(record_path, ids)
    assert defaults["max_tokens"] == 16 and defaults["stop"] == ["single"] and defaults["temperature"] == 1.0
    assert defaults["top_k"] == 0 and defaults["logprobs"] is None and defaults["seed"] is None


@toy_only
def test_finish_reasons_for_eos_stop_token_ids_min_tokens_and_ignore_eos(toy_server):
    client = toy_server.client()
    eos = client.completions.create(model=MODEL, prompt="t997", max_tokens=10)  # 998 999 0=EOS
    assert (eos.choices[0].finish_reason, eos.usage.completion_tokens) == ("stop", 3)
    ignored = client.completions.create(model=MODEL, prompt="t997", max_tokens=10, extra_body={"ignore_eos": True})
    assert (ignored.choices[0].finish_reason, ignored.usage.completion_tokens) == ("length", 10)
    held = client.completions.create(model=MODEL, prompt="t997", max_tokens=10, extra_body={"min_tokens": 5})
    assert (held.choices[0].finish_reason, held.usage.completion_tokens) == ("length", 10)
    token = client.completions.create(model=MODEL, prompt="t5", max_tokens=10, extra_body={"stop_token_ids": [8]})
    assert (token.choices[0].finish_reason, token.usage.completion_tokens) == ("stop", 3)


@toy_only
def test_stop_strings_end_the_choice_and_abort_the_engine_task(toy_server):
    client = toy_server.client()
    before = toy_server.metric("flowserve:request_success_total", finished_reason="stop")
    stopped = client.completions.create(model=MODEL, prompt="t5", max_tokens=200, stop=" t9")
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (" t6 t7 t8", "stop")
    assert stopped.usage.completion_tokens == 4  # the engine task ended at the stop, not at max_tokens
    assert toy_server.metric("flowserve:request_success_total", finished_reason="stop") == before + 1
    kept = client.completions.create(model=MODEL, prompt="t5", max_tokens=200, stop=[" t9", "t12"],
                                     extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == " t6 t7 t8 t9"


@toy_only
def test_streaming_never_emits_text_that_a_stop_string_swallows(toy_server):
    # "9 t1" straddles the tokens " t9" and " t10": " t9" must be held back until " t10" decides it
    with httpx.stream("POST", toy_server.base_url + "/completions", timeout=30, json={
            "model": MODEL, "prompt": "t5", "max_tokens": 50, "stop": "9 t1", "stream": True}) as response:
        raw = response.read().decode()
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts) == " t6 t7 t8 t"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "stop"
