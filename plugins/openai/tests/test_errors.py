"""Errors in OpenAI's shape with the right status, from raw HTTP and from the openai client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai_live import MODEL, TOY_CONTEXT, sse_events, toy_only


def post(server, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.base_url + path, content=content, timeout=30, **kw)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_malformed_json_is_a_400(toy_server):
    error = error_of(post(toy_server, "/completions", b'{"model": "toy", "prompt": '), 400)
    assert error["type"] == "invalid_request_error" and error["param"] is None
    assert "not valid JSON" in error["message"]
    error_of(post(toy_server, "/chat/completions", b"[1, 2]"), 400)
    error_of(post(toy_server, "/completions", b"\xff\xfe"), 400)
    deep = b'{"model": "toy", "prompt": "t1", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert "nested too deeply" in error_of(post(toy_server, "/completions", deep), 400)["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/completions", {"model": MODEL, "prompt": "t1", "max_tokens": "ten"}, "max_tokens"),
    ("/completions", {"model": MODEL, "prompt": {"text": "t1"}}, "prompt"),
    ("/completions", {"model": MODEL}, "prompt"),
    ("/completions", {"model": MODEL, "prompt": "t1", "temperature": -1}, "temperature"),
    ("/completions", {"model": MODEL, "prompt": "t1", "top_p": 0}, "top_p"),
    ("/completions", {"model": MODEL, "prompt": "t1", "logprobs": 21}, "logprobs"),
    ("/completions", {"model": MODEL, "prompt": "t1", "stop": [""]}, "stop[0]"),
    ("/completions", {"model": MODEL, "prompt": "t1", "n": 0}, "n"),
    ("/completions", {"model": MODEL, "prompt": "t1", "stream": "yes"}, "stream"),
    ("/completions", {"model": MODEL, "prompt": "t1", "max_tokens": 2, "min_tokens": 3}, "min_tokens"),
    ("/completions", {"model": MODEL, "prompt": "", "max_tokens": 2}, "prompt"),
    ("/completions", {"model": MODEL, "prompt": [5, 100000]}, "prompt"),
    ("/completions", {"model": MODEL, "prompt": ["t1", 5]}, "prompt"),
    ("/completions", {"model": MODEL, "prompt": "t1", "suffix": "end"}, "suffix"),
    ("/completions", {"model": MODEL, "prompt": "t1", "logit_bias": {"five": 10}}, "logit_bias"),
    ("/completions", {"model": MODEL, "prompt": "t1", "logit_bias": {"5": 100.5}}, "logit_bias"),
    ("/completions", {"model": MODEL, "prompt": "t1", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/completions", {"model": MODEL, "prompt": "t1", "n": 17}, "n"),
    ("/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ("/chat/completions", {"model": MODEL, "messages": [{"content": "x"}]}, "messages[0].role"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0].type"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "t1"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "t1"}], "top_logprobs": 2},
     "top_logprobs"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "t1"}],
                           "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "t1"}],
                           "response_format": {"type": "xml"}}, "response_format.type"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "t1"}], "frequency_penalty": 3},
     "frequency_penalty"),
    ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "t1"}], "max_tokens": 3,
                           "min_tokens": 4}, "min_tokens"),
])
def test_bad_values_are_400s_naming_the_parameter(toy_server, path, body, param):
    error = error_of(post(toy_server, path, body), 400)
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"


def test_the_openai_client_sees_bad_requests_as_BadRequestError(toy_server):
    with pytest.raises(openai.BadRequestError) as caught:
        toy_server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "t1"}],
                                                    temperature=-0.5)
    assert caught.value.body["param"] == "temperature"


def test_unknown_model_is_a_404_naming_the_served_models(toy_server):
    error = error_of(post(toy_server, "/completions", {"model": "gpt-9", "prompt": "t1"}), 404)
    assert error["param"] == "model" and error["code"] == "model_not_found"
    assert "'gpt-9'" in error["message"] and MODEL in error["message"]
    with pytest.raises(openai.NotFoundError):
        toy_server.client().chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "t1"}])
    with pytest.raises(openai.NotFoundError):
        toy_server.client().models.retrieve("gpt-9")


@toy_only
def test_context_overflow_is_a_400_with_both_numbers(toy_server):
    prompt = " ".join(["t1"] * 250)
    error = error_of(post(toy_server, "/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 10}), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert str(TOY_CONTEXT) in error["message"] and "260" in error["message"] and "250" in error["message"]
    chat = post(toy_server, "/chat/completions", {"model": MODEL, "max_tokens": 300,
                                                  "messages": [{"role": "user", "content": "t1"}]})
    assert error_of(chat, 400)["param"] == "messages"
    filling = [{"role": "user", "content": prompt + " t2 t3 t4 t5 t6"}]  # no room left for a reply
    full = post(toy_server, "/chat/completions", {"model": MODEL, "messages": filling})
    assert error_of(full, 400)["code"] == "context_length_exceeded"


def test_a_body_over_the_limit_is_a_413(toy_server):
    big = {"model": MODEL, "prompt": "t1 " * (2 * 1024 * 1024)}  # ~6 MiB, over the default 4 MiB
    error = error_of(post(toy_server, "/completions", big), 413)
    assert "4194304" in error["message"]


def test_unknown_paths_and_methods_answer_in_openai_shape(toy_server):
    assert error_of(httpx.get(toy_server.base_url + "/nothing-here", timeout=10), 404)["code"] == "not_found"
    assert error_of(httpx.get(toy_server.base_url + "/completions", timeout=10), 405)["code"] == "method_not_allowed"


@toy_only
def test_an_engine_failure_mid_stream_ends_the_stream_with_an_error_event(toy_server):
    # the toy server fails any step that would emit token 900
    body = {"model": MODEL, "prompt": "t895", "max_tokens": 20, "stream": True}
    with httpx.stream("POST", toy_server.base_url + "/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        events = sse_events(response.read().decode())
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "injected failure on token 900" in error["message"]
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2]) == " t896 t897 t898 t899"
    with pytest.raises(openai.APIError, match="injected failure"):
        list(toy_server.client().completions.create(model=MODEL, prompt="t898", max_tokens=5, stream=True))
    # not streamed: a 500 in OpenAI's shape
    error = error_of(post(toy_server, "/completions", {"model": MODEL, "prompt": "t897", "max_tokens": 5}), 500)
    assert error["type"] == "server_error"
    assert toy_server.wait_metric("flowserve:num_requests_running", lambda v: v == 0) == 0
