"""/v1/chat/completions through the official openai client (sync and async) and raw SSE."""

from __future__ import annotations

import json

import httpx
import pytest
from openai_live import MODEL, recorded_params, sse_events, toy_only, unique_prompt

pytestmark = pytest.mark.anyio

CONVERSATION = [
    {"role": "system", "content": "t1"},
    {"role": "user", "content": "t2"},
    {"role": "assistant", "content": "t3"},
    {"role": "user", "content": "t4"},
]


async def test_chat_completion_fields_and_roles(toy_server):
    async with toy_server.async_client() as client:
        chat = await client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=3)
        assert chat.id.startswith("chatcmpl-") and chat.object == "chat.completion"
        assert chat.model == MODEL and chat.system_fingerprint.startswith("fp_") and isinstance(chat.created, int)
        [choice] = chat.choices
        assert choice.message.role == "assistant" and choice.finish_reason == "length" and choice.logprobs is None
        assert chat.usage.completion_tokens == 3
        assert chat.usage.total_tokens == chat.usage.prompt_tokens + 3
        # content as a list of text parts is the same conversation; "developer" reads as "system"
        parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in CONVERSATION]
        parts[0]["role"] = "developer"
        again = await client.chat.completions.create(model=MODEL, messages=parts, max_tokens=3)
        assert again.choices[0].message.content == choice.message.content
        assert again.usage.prompt_tokens == chat.usage.prompt_tokens


@toy_only
def test_chat_text_of_the_toy(toy_server):
    chat = toy_server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "t7"}], max_tokens=3)
    assert chat.choices[0].message.content == " t8 t9 t10"


def test_chat_stream_framing_role_first_finish_last_usage_then_done(toy_server):
    body = {"model": MODEL, "messages": CONVERSATION, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", toy_server.base_url + "/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert all(c["usage"] is None for c in chunks[:-1])
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2])
    whole = toy_server.client().chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=4)
    assert content == whole.choices[0].message.content


async def test_streamed_chat_with_the_async_client(toy_server):
    async with toy_server.async_client() as client:
        stream = await client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=5, stream=True,
                                                      stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].choices == []
        assert chunks[-2].choices[0].finish_reason == "length"
        whole = await client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=5)
        assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content


def test_chat_logprobs_shape(toy_server):
    client = toy_server.client()
    chat = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=3, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3
    assert "".join(entry.token for entry in content) == chat.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert all(top.bytes == list(top.token.encode()) for top in entry.top_logprobs)
    plain = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=2, logprobs=True)
    assert all(entry.top_logprobs == [] for entry in plain.choices[0].logprobs.content)
    streamed = list(client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=3,
                                                   logprobs=True, top_logprobs=2, stream=True))
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert tokens == [entry.token for entry in content]


def test_default_max_tokens_is_the_rest_of_the_context(toy_server):
    client = toy_server.client()
    context = client.models.retrieve(MODEL).max_model_len
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "t1"}])
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.total_tokens == context


@toy_only
def test_chat_parameters_reach_the_engine(toy_server, record_path):
    text, ids = unique_prompt(4)
    chat = toy_server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=50, max_completion_tokens=3,
        logprobs=True, top_logprobs=4, n=2, seed=100, temperature=0.2, stop="never",
        extra_body={"top_k": 3, "min_p": 0.05, "repetition_penalty": 1.1})
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 6
    params = sorted(recorded_params(record_path, ids), key=lambda p: p["seed"])
    assert [p["seed"] for p in params] == [100, 101]
    for p in params:
        assert (p["max_tokens"], p["logprobs"], p["temperature"], p["stop"]) == (3, 4, 0.2, ["never"])
        assert (p["top_k"], p["min_p"], p["repetition_penalty"]) == (3, 0.05, 1.1)


@toy_only
def test_chat_stop_string(toy_server):
    chat = toy_server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "t7"}], max_tokens=30, stop=[" t11"])
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == (" t8 t9 t10", "stop")


async def test_n_streamed_choices_each_open_and_close(toy_server):
    async with toy_server.async_client() as client:
        stream = await client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=4, n=3, seed=1,
                                                      stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage.completion_tokens == 12
        by_choice: dict[int, list] = {}
        for chunk in chunks[:-1]:
            [choice] = chunk.choices
            by_choice.setdefault(choice.index, []).append(choice)
        assert sorted(by_choice) == [0, 1, 2]
        whole = await client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=4, n=3, seed=1)
        for index, parts in by_choice.items():
            assert parts[0].delta.role == "assistant" and parts[-1].finish_reason == "length"
            assert "".join(p.delta.content or "" for p in parts) == whole.choices[index].message.content
