"""Issue 19's small items on SmolLM2 (real model, spmd executor, shared sampler), through the
official openai client and raw HTTP: ``logit_bias``, ``usage.prompt_tokens_details.cached_tokens``
and vLLM's ``/tokenize`` and ``/detokenize``."""

from __future__ import annotations

import httpx
import openai
import pytest
from smol_live import NAME, needs_smollm2, start_smol

pytestmark = needs_smollm2

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol(start_server):
    return start_smol(start_server)


def test_logit_bias_bans_and_forces_tokens(smol):
    client = smol.client()
    plain = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=6, temperature=0,
                                           logprobs=True)
    first = plain.choices[0].logprobs.content[0].token
    first_id = smol_token_id(smol, first)
    banned = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=6, temperature=0,
                                            logprobs=True, logit_bias={str(first_id): -100})
    assert banned.choices[0].logprobs.content[0].token != first
    forced_id = smol_token_id(smol, " zebra")
    forced = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=4, temperature=0.8, seed=3,
                                            logit_bias={str(forced_id): 100})
    assert forced.choices[0].message.content == " zebra" * 4
    completion = client.completions.create(model=NAME, prompt="One, two,", max_tokens=3, temperature=0,
                                           logit_bias={str(forced_id): 100})
    assert completion.choices[0].text == " zebra" * 3


@pytest.mark.parametrize("bias, why", [({"zebra": 5}, "not a token id"), ({"99999999": 5}, "not a token id"),
                                       ({"5": 100.5}, "<= 100"), ({"5": -101}, ">= -100")])
def test_a_bad_logit_bias_is_a_400_naming_it(smol, bias, why):
    with pytest.raises(openai.BadRequestError) as caught:
        smol.client().chat.completions.create(model=NAME, messages=QUESTION, max_tokens=2, logit_bias=bias)
    assert caught.value.body["param"] == "logit_bias" and why in caught.value.body["message"]


def test_cached_tokens_count_the_prefix_cache_hits(smol):
    client = smol.client()
    # a long system prompt of its own (no other test shares its blocks), then the same again
    system = {"role": "system", "content": "You answer briefly. " * 40 + "Unique marker 7731."}
    cold = client.chat.completions.create(model=NAME, messages=[system, *QUESTION], max_tokens=2, temperature=0)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    warm = client.chat.completions.create(model=NAME, messages=[system, *QUESTION], max_tokens=2, temperature=0)
    cached = warm.usage.prompt_tokens_details.cached_tokens
    assert warm.usage.prompt_tokens - 16 <= cached < warm.usage.prompt_tokens  # whole blocks, not the last token
    stream = client.chat.completions.create(model=NAME, messages=[system, *QUESTION], max_tokens=2, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert usage[-1].prompt_tokens_details.cached_tokens == cached


def smol_token_id(server, text: str) -> int:
    r = httpx.post(server.url + "/tokenize", json={"model": NAME, "prompt": text, "add_special_tokens": False},
                   timeout=30)
    [token] = r.json()["tokens"]
    return token


def test_tokenize_and_detokenize_have_vllms_shapes(smol):
    r = httpx.post(smol.url + "/tokenize", json={"model": NAME, "prompt": "Hello world", "return_token_strs": True},
                   timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["count"] == len(body["tokens"]) == 2 and body["max_model_len"] == 1024
    assert body["token_strs"] == ["Hello", " world"]
    back = httpx.post(smol.url + "/detokenize", json={"model": NAME, "tokens": body["tokens"]}, timeout=30)
    assert back.json() == {"prompt": "Hello world"}
    # a chat is rendered by the template, as /v1/chat/completions renders it: the same prompt_tokens
    chat = httpx.post(smol.url + "/tokenize", json={"model": NAME, "messages": QUESTION}, timeout=30).json()
    usage = smol.client().chat.completions.create(model=NAME, messages=QUESTION, max_tokens=1).usage
    assert chat["count"] == usage.prompt_tokens and chat["token_strs"] is None
    bad = httpx.post(smol.url + "/detokenize", json={"model": NAME, "tokens": [10**8]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    both = httpx.post(smol.url + "/tokenize", json={"model": NAME, "prompt": "x", "messages": QUESTION}, timeout=30)
    assert both.status_code == 400
