"""The hostile requests ``test_fuzz`` sends, as hypothesis strategies: every named case of the
reliability issue (broken JSON, wrong types, huge, negative and NaN numbers, unknown fields,
invalid UTF-8, prompts past the context, empty message lists, token ids out of range, ``n``
too large) and random mutations of valid bodies, each as (path, raw body)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

#: Field names the two generation endpoints know, and a few they do not.
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "n", "stream", "stream_options",
          "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "logprobs", "top_logprobs",
          "echo", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos",
          "logit_bias", "suffix", "best_of", "tools", "response_format", "user", "skip_special_tokens"]
UNKNOWN_FIELDS = ["__proto__", "constructor", "x" * 300, "$where", "model\u0000", "\U0001f600", "functions"]

HUGE_INTS = st.sampled_from([2**31, 2**53 + 1, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30), 10**400])
HOSTILE_NUMBERS = st.one_of(
    HUGE_INTS, st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-1, -0.0, 0, 1e308, -1e308, 5e-324]))
HOSTILE_STRINGS = st.one_of(
    st.text(max_size=64), st.sampled_from(["", " ", "\u0000", "\ud800", "\udfff", "t1" * 5000, "../../etc/passwd",
                                           "__import__('os').system('true')", "{{7*7}}", "%s%n%x"]))


def json_values(depth: int = 2) -> st.SearchStrategy[Any]:
    """Any JSON value (and a few that JSON cannot hold: NaN, infinities, lone surrogates)."""
    leaves = st.one_of(st.none(), st.booleans(), HOSTILE_NUMBERS, HOSTILE_STRINGS)
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=8)


@dataclass
class Target:
    """The server under fuzz: where, which model, its vocabulary, context and limits."""

    url: str
    model: str
    vocab_size: int
    max_model_len: int
    max_n: int
    max_body_bytes: int


def valid_bodies(target: Target) -> st.SearchStrategy[tuple[str, dict]]:
    """Small valid requests of both endpoints (the starting point of mutations)."""
    completion = st.fixed_dictionaries({
        "model": st.just(target.model), "prompt": st.sampled_from(["t1 t2", "hello world", [1, 2, 3]]),
        "max_tokens": st.integers(1, 4)}, optional={"stream": st.booleans(), "n": st.integers(1, 2)})
    chat = st.fixed_dictionaries({
        "model": st.just(target.model), "messages": st.just([{"role": "user", "content": "t1 hello"}]),
        "max_tokens": st.integers(1, 4)}, optional={"stream": st.booleans()})
    return st.one_of(st.tuples(st.just("/v1/completions"), completion),
                     st.tuples(st.just("/v1/chat/completions"), chat))


def targeted(target: Target) -> st.SearchStrategy[tuple[str, dict]]:
    """The named hostile cases of the issue, with random details."""
    over_context = " ".join(["t1"] * (target.max_model_len + 10))
    out_of_range = st.one_of(st.integers(target.vocab_size, 2**31 - 1), st.integers(-(2**63), -1),
                             st.sampled_from([2**31, 2**63]))
    return st.one_of(
        st.builds(lambda n: ("/v1/completions", {"model": target.model, "prompt": "t1", "max_tokens": 1, "n": n}),
                  st.one_of(st.integers(target.max_n + 1, 10**6), st.integers(-5, 0), HUGE_INTS)),
        st.builds(lambda k: ("/v1/completions", {"model": target.model, "prompt": over_context, "max_tokens": k}),
                  st.integers(1, 8)),
        st.builds(lambda k: ("/v1/chat/completions", {"model": target.model, "max_tokens": k, "messages": [
            {"role": "user", "content": over_context}]}), st.one_of(st.none(), st.integers(1, 8))),
        st.builds(lambda: ("/v1/chat/completions", {"model": target.model, "messages": []})),
        st.builds(lambda ids: ("/v1/completions", {"model": target.model, "prompt": ids, "max_tokens": 1}),
                  st.lists(out_of_range, min_size=1, max_size=3).map(lambda bad: [1, *bad])),
        st.builds(lambda ids: ("/v1/completions", {"model": target.model, "prompt": "t1", "max_tokens": 1,
                                                   "stop_token_ids": ids}), st.lists(out_of_range, min_size=1)),
        st.builds(lambda value, name: ("/v1/completions", {"model": target.model, "prompt": "t1", "max_tokens": 1,
                                                           name: value}),
                  HOSTILE_NUMBERS, st.sampled_from(["temperature", "top_p", "max_tokens", "seed", "logprobs",
                                                    "presence_penalty", "min_p", "top_k", "repetition_penalty"])),
    )


def mutated(target: Target) -> st.SearchStrategy[tuple[str, dict]]:
    """A valid body with one field set to a hostile value, removed, or an unknown field added."""

    @st.composite
    def mutate(draw: Any) -> tuple[str, dict]:
        path, body = draw(valid_bodies(target))
        body = dict(body)
        action = draw(st.sampled_from(["set", "drop", "unknown"]))
        if action == "set":
            body[draw(st.sampled_from(FIELDS))] = draw(json_values())
        elif action == "drop" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        else:
            body[draw(st.sampled_from(UNKNOWN_FIELDS))] = draw(json_values(1))
        return path, body

    return mutate()


def encode(body: Any, ascii: bool = False) -> bytes:
    """JSON as a sloppy client writes it: NaN and Infinity literals, lone surrogates as-is
    (invalid UTF-8) or, with ``ascii``, as ``\\ud800`` escapes."""
    return json.dumps(body, allow_nan=True, ensure_ascii=ascii).encode("utf-8", "surrogatepass")


def raw_bodies(target: Target) -> st.SearchStrategy[tuple[str, bytes]]:
    """Bytes that are not a valid JSON request: truncated, corrupted, invalid UTF-8, not JSON."""

    @st.composite
    def corrupt(draw: Any) -> tuple[str, bytes]:
        path, body = draw(valid_bodies(target))
        data = encode(body)
        how = draw(st.sampled_from(["truncate", "flip", "utf8", "garbage", "empty", "deep"]))
        if how == "truncate":
            data = data[:draw(st.integers(0, len(data) - 1))]
        elif how == "flip":
            at = draw(st.integers(0, len(data) - 1))
            data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1:]
        elif how == "utf8":  # invalid UTF-8 inside a string value
            data = data.replace(b'"' + target.model.encode() + b'"',
                                b'"' + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80abc"])) + b'"')
        elif how == "garbage":
            data = draw(st.binary(max_size=256))
        elif how == "empty":
            data = b""
        else:
            depth = draw(st.integers(100, 50_000))
            data = b'{"model": "' + target.model.encode() + b'", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
        return path, data

    return corrupt()


def hostile_requests(target: Target) -> st.SearchStrategy[tuple[str, bytes]]:
    """Every kind of hostile request, as (path, raw body)."""
    as_bytes = st.tuples(st.one_of(targeted(target), mutated(target)), st.booleans()).map(
        lambda request: (request[0][0], encode(request[0][1], ascii=request[1])))
    return st.one_of(as_bytes, raw_bodies(target))
