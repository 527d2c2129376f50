"""Prompt logprobs through a live ``flowserve serve`` (spmd, float32, real instance process)
and the official ``openai`` client: completions' ``echo`` with ``logprobs`` (also with
``max_tokens: 0``, the prompt scored alone) and vLLM's ``prompt_logprobs`` equal transformers'
log-softmax over the prompt, whether the prompt is computed in chunks, found in the prefix cache
or asked for again, streamed or not."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from spmd_helpers import hf_greedy, load_hf, random_prompt, save_tiny_architecture

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("flowserve_openai") is None, reason="needs the openai frontend"),
]

openai = pytest.importorskip("openai")

PROMPT_TOKENS = 40  # computed in chunks of 16 (--max-num-batched-tokens)


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_tokenizer))
    model_dir = save_tiny_architecture(tmp_path_factory.mktemp("tiny-qwen3-scored"), "qwen3", seed=41,
                                       vocab_size=len(tokenizer))
    tokenizer.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def server(tiny: Path) -> Iterator[Any]:
    from flowserve_testing.live import serve

    with serve(str(tiny), "--served-model-name", "tiny", "--dtype", "float32", "--device", "cpu",
               "--kv-cache-memory", "8MiB", "--max-model-len", "256", "--max-num-batched-tokens", "16",
               health_path="/ready", timeout=300) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[Any]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def prompt(tiny: Path) -> list[int]:
    from transformers import AutoTokenizer

    return random_prompt(PROMPT_TOKENS, seed=77, vocab=len(AutoTokenizer.from_pretrained(str(tiny))))


@pytest.fixture(scope="module")
def expected(tiny: Path, prompt: list[int]) -> torch.Tensor:
    """transformers' log-softmax at every prompt position (row i scores prompt token i + 1)."""
    with torch.no_grad():
        logits = load_hf(tiny)(torch.tensor([prompt])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _check_legacy(logprobs: Any, prompt: list[int], expected: torch.Tensor, top: int) -> None:
    """Completions' echo logprobs of the prompt: null first, then transformers' values."""
    assert len(logprobs.token_logprobs) >= len(prompt)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for i in range(1, len(prompt)):
        assert logprobs.token_logprobs[i] == pytest.approx(expected[i - 1, prompt[i]].item(), abs=1e-4)
        assert sorted(logprobs.top_logprobs[i].values(), reverse=True) == pytest.approx(
            expected[i - 1].topk(top).values.tolist(), abs=1e-4)


def test_echo_with_max_tokens_0_scores_the_prompt_alone(client, prompt, expected):
    answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = answer.choices[0]
    assert choice.finish_reason == "length"
    assert answer.usage.prompt_tokens == PROMPT_TOKENS and answer.usage.completion_tokens == 0
    assert len(choice.logprobs.tokens) == PROMPT_TOKENS  # the prompt's and nothing generated
    assert choice.text == "".join(choice.logprobs.tokens)
    _check_legacy(choice.logprobs, prompt, expected, top=2)


def test_the_prompt_is_scored_whole_even_when_it_is_in_the_prefix_cache(client, prompt, expected, tiny):
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0)
    assert plain.usage.prompt_tokens_details.cached_tokens > 0  # the scoring above filled the cache
    answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                       echo=True, logprobs=1, extra_body={"ignore_eos": True})
    choice = answer.choices[0]
    assert answer.usage.prompt_tokens_details.cached_tokens == 0  # every position computed again
    _check_legacy(choice.logprobs, prompt, expected, top=1)
    assert len(choice.logprobs.tokens) == PROMPT_TOKENS + 6
    generated = hf_greedy(load_hf(tiny), prompt, 6)
    assert choice.logprobs.token_logprobs[PROMPT_TOKENS] == pytest.approx(
        expected[PROMPT_TOKENS - 1, generated[0]].item(), abs=1e-4)


def test_vllm_prompt_logprobs_give_token_ranks_and_alternatives(client, prompt, expected):
    answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0,
                                       extra_body={"prompt_logprobs": 3})
    scored = answer.choices[0].model_extra["prompt_logprobs"]
    assert len(scored) == PROMPT_TOKENS and scored[0] is None
    for i in range(1, PROMPT_TOKENS):
        row = expected[i - 1]
        entry = scored[i][str(prompt[i])]
        assert entry["logprob"] == pytest.approx(row[prompt[i]].item(), abs=1e-4)
        value = row[prompt[i]]  # its rank: 1 + the better tokens (ties within float noise either way)
        assert int((row > value + 1e-4).sum()) + 1 <= entry["rank"] <= int((row > value - 1e-4).sum()) + 1
        best = row.topk(3)
        for rank, (token, value) in enumerate(zip(best.indices.tolist(), best.values.tolist()), start=1):
            assert scored[i][str(token)]["logprob"] == pytest.approx(value, abs=1e-4)
            assert scored[i][str(token)]["rank"] == rank
        assert len(scored[i]) in (3, 4)  # the token itself, when not among the best
    assert answer.choices[0].logprobs is None  # not asked for the generated tokens


def test_streamed_echo_carries_the_same_prompt_logprobs(client, prompt, expected):
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                      logprobs=1)
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0,
                                            echo=True, logprobs=1, stream=True))
    echo = chunks[0].choices[0]
    assert echo.text == "".join(whole.choices[0].logprobs.tokens[:PROMPT_TOKENS])
    _check_legacy(echo.logprobs, prompt, expected, top=1)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    streamed = [v for c in chunks for v in c.choices[0].logprobs.token_logprobs]
    assert streamed[1:] == pytest.approx(whole.choices[0].logprobs.token_logprobs[1:], abs=1e-5)


def test_chat_prompt_logprobs_and_what_is_refused(client, server):
    import httpx

    messages = [{"role": "user", "content": "Say something."}]
    answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2,
                                            extra_body={"prompt_logprobs": 0})
    scored = answer.model_extra["prompt_logprobs"]
    assert len(scored) == answer.usage.prompt_tokens and scored[0] is None
    assert all(len(entry) == 1 and next(iter(entry.values()))["logprob"] <= 0 for entry in scored[1:])
    for path, body, param in [
        ("/v1/chat/completions", {"messages": messages, "stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
    ]:
        reply = httpx.post(server.url + path, json={"model": "tiny", **body}, timeout=30)
        assert reply.status_code == 400, reply.text
        error = json.loads(reply.text)["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error"
