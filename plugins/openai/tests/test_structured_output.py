"""Structured output on SmolLM2 through the spmd executor and the shared sampler (issue 19):
OpenAI's ``response_format`` (``json_object``, ``json_schema``), vLLM's ``structured_outputs``
and ``guided_*`` fields, streamed and not, checked with ``jsonschema``; 400s for what cannot be
enforced; and a backend plugin written here (a fixed choice list over token ids) proving the seam."""

from __future__ import annotations

import json
import re
import textwrap

import httpx
import openai
import pytest
from smol_live import NAME, needs_smollm2, smol_command, start_smol

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("flowserve_xgrammar")

pytestmark = needs_smollm2

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "languages": {"type": "array", "items": {"enum": ["en", "fr", "de"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Tell me about a person who lives in Paris."}]


@pytest.fixture(scope="module")
def smol(start_server):
    return start_smol(start_server)


def person_format(strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_json_schema_output_always_validates(smol, temperature):
    chat = smol.client().chat.completions.create(model=NAME, messages=ASK, max_tokens=120, temperature=temperature,
                                                 seed=11, n=2, response_format=person_format())
    for choice in chat.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_schema_streamed_validates_and_matches_the_unstreamed_answer(smol):
    client = smol.client()
    whole = client.chat.completions.create(model=NAME, messages=ASK, max_tokens=120, temperature=0,
                                           response_format=person_format())
    stream = client.chat.completions.create(model=NAME, messages=ASK, max_tokens=120, temperature=0, stream=True,
                                            response_format=person_format())
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert text == whole.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_is_one_json_object(smol):
    client = smol.client()
    for stream in (False, True):
        kwargs = dict(model=NAME, messages=[{"role": "user", "content": "List three colours."}], max_tokens=80,
                      temperature=0.7, seed=4, response_format={"type": "json_object"})
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                stream=True, **kwargs) if c.choices)
        else:
            text = client.chat.completions.create(**kwargs).choices[0].message.content
        assert isinstance(json.loads(text), dict), text


def test_vllm_fields_choice_regex_grammar_and_json_on_both_endpoints(smol):
    client = smol.client()
    choices = ["Paris", "London", "Berlin"]
    for extra in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        chat = client.chat.completions.create(model=NAME, messages=ASK, max_tokens=10, temperature=1.0, seed=2,
                                              extra_body=extra)
        assert chat.choices[0].message.content in choices
    phone = r"\d{3}-\d{4}"
    for extra in ({"guided_regex": phone}, {"structured_outputs": {"regex": phone}}):
        done = client.completions.create(model=NAME, prompt="My phone number is", max_tokens=12, temperature=1.0,
                                         seed=5, extra_body=extra)
        assert re.fullmatch(phone, done.choices[0].text), done.choices[0].text
    grammar = 'root ::= "yes" | "no" | "maybe " [0-9]'
    for extra in ({"guided_grammar": grammar}, {"structured_outputs": {"grammar": grammar}}):
        done = client.completions.create(model=NAME, prompt="Is it raining?", max_tokens=5, temperature=1.0, seed=1,
                                         extra_body=extra)
        assert re.fullmatch(r"yes|no|maybe [0-9]", done.choices[0].text), done.choices[0].text
    for extra in ({"guided_json": PERSON}, {"structured_outputs": {"json": json.dumps(PERSON)}}):
        done = client.completions.create(model=NAME, prompt="A person:", max_tokens=120, temperature=0.8, seed=9,
                                         extra_body=extra)
        jsonschema.validate(json.loads(done.choices[0].text), PERSON)


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}},
     "response_format", ["'not'", "xgrammar"]),
    ({"guided_json": {"type": "object", "properties": {"a": {"if": {"type": "string"}}}}}, "guided_json",
     ["'if'", "#/properties/a"]),
    ({"guided_regex": "a[b"}, "guided_regex", ["regex", "cannot be compiled"]),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar", ["grammar", "undefined_rule"]),
    ({"guided_choice": []}, "guided_choice", ["at least one"]),
    ({"guided_json": "{not json"}, "guided_json", ["not valid JSON"]),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice", ["Only one kind"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema",
     ["required"]),
])
def test_what_cannot_be_enforced_is_a_400_naming_it(smol, body, param, words):
    r = httpx.post(smol.base_url + "/chat/completions", timeout=60,
                   json={"model": NAME, "messages": ASK, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error


def test_the_openai_client_parse_helper_gets_a_valid_object(smol):
    pydantic = pytest.importorskip("pydantic")

    class City(pydantic.BaseModel):  # bounded strings: a 135M model may ramble inside a string
        name: str = pydantic.Field(max_length=24)
        country: str = pydantic.Field(max_length=24)
        population: int = pydantic.Field(ge=0, le=10**9)

    parsed = smol.client().beta.chat.completions.parse(
        model=NAME, messages=[{"role": "user", "content": "Describe Paris as JSON."}], max_tokens=100,
        temperature=0, response_format=City)
    assert parsed.choices[0].finish_reason == "stop", parsed.choices[0].message.content
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City) and isinstance(city.population, int)


BACKEND = '''
"""A structured-output backend written by a test: "choice" constraints only, over token ids."""

from flowserve_core import hookimpl
from flowserve_core.structured_output import UnsupportedConstraint
from flowserve_sampler import fill_from_ids


class FirstTokenMatcher:
    """Allows the first token of each choice, then only end-of-sequence."""

    def __init__(self, starts, eos):
        self.starts, self.eos, self.seen = starts, eos, []

    def accept_token(self, token_id):
        self.seen.append(token_id)
        return token_id in (self.starts if len(self.seen) == 1 else self.eos)

    def fill_bitmask(self, bitmask, row):
        fill_from_ids(bitmask, row, self.starts if not self.seen else self.eos)

    def is_terminated(self):
        return len(self.seen) >= 2


class ChoiceOfTokenIds:
    def __init__(self, spec):
        self.spec = spec

    def check(self, constraint):
        if constraint.choice is None or not all(c.isdigit() for c in constraint.choice):
            raise UnsupportedConstraint(f"token-choice only takes choices of token ids, not {constraint.kind}")

    def matcher(self, constraint, vocab_size, eos_token_ids):
        self.check(constraint)
        return FirstTokenMatcher([int(c) for c in constraint.choice], list(eos_token_ids))


@hookimpl
def flowserve_register_structured_output_backends(register):
    register("token-choice", ChoiceOfTokenIds)
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """A distribution on PYTHONPATH (a module and its dist-info with a ``flowserve`` entry point),
    as an installed plugin looks to importlib.metadata."""
    root = tmp_path_factory.mktemp("token_choice")
    (root / "flowserve_token_choice.py").write_text(textwrap.dedent(BACKEND))
    info = root / "flowserve_token_choice-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flowserve-token-choice\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[flowserve]\ntoken_choice = flowserve_token_choice\n")
    return root


def test_a_backend_plugin_written_here_constrains_the_sampler(start_server, plugin_path):
    import os

    server = start_server(smol_command("--structured-output-backend", "token-choice"), env={
        "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(plugin_path), os.environ.get("PYTHONPATH")]))})
    client = server.client()
    tokenized = httpx.post(server.url + "/tokenize", timeout=30, json={
        "prompt": " zebra giraffe", "add_special_tokens": False, "return_token_strs": True}).json()
    tokens, texts = tokenized["tokens"], tokenized["token_strs"]
    for seed in range(4):
        done = client.completions.create(model=NAME, prompt="An animal:", max_tokens=5, temperature=1.0, seed=seed,
                                         extra_body={"guided_choice": [str(t) for t in tokens]}, logprobs=0)
        # one of the allowed tokens, then end-of-sequence
        assert done.choices[0].finish_reason == "stop" and done.choices[0].text in texts
        assert done.choices[0].logprobs.tokens == [done.choices[0].text, "<|im_end|>"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=NAME, messages=ASK, max_tokens=5, response_format={"type": "json_object"})
    assert "token-choice only takes choices of token ids, not json_object" in caught.value.body["message"]
