"""The bodies of ``POST /v1/embeddings``, as msgspec Structs (OpenAI's shapes; see ``embeddings.py``)."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

from flowserve_openai.protocol import INT32_MAX, TokenId

#: OpenAI's limit on the inputs of one call.
MAX_EMBEDDING_INPUTS = 2048

ENCODING_FORMATS = ("float", "base64")
ENCODING_FORMAT_SCHEMA = {"enum": list(ENCODING_FORMATS), "default": "float",
                          "description": "float: a list of numbers; base64: little-endian float32 bytes in base64."}

#: ``input`` as the OpenAPI document states it: msgspec's type is broader (one union of
#: items), ``embedding_inputs`` enforces this one.
INPUT_SCHEMA = {
    "description": "A string, a list of strings, a list of token ids, or a list of lists of token ids; "
                   "each one is embedded on its own.",
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS,
         "items": {"type": "string", "minLength": 1}},
        {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": INT32_MAX}},
        {"type": "array", "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS, "items": {
            "type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": INT32_MAX}}},
    ],
}


class EmbeddingRequest(Struct, kw_only=True):
    """``POST /v1/embeddings``: OpenAI's fields, and vLLM's ``add_special_tokens``."""

    input: str | list[str | TokenId | list[TokenId]]
    model: str | None = None
    #: "float" or "base64" (a str here so that another value gets a message naming both; the
    #: OpenAPI document states the enum)
    encoding_format: str = "float"
    #: Matryoshka models only: the vector's first ``dimensions`` values, normalized again
    dimensions: Annotated[int, Meta(ge=1, le=INT32_MAX)] | None = None
    user: str | None = None
    #: vLLM's: whether text inputs get the tokenizer's special tokens (BOS, ...)
    add_special_tokens: bool = True


class Embedding(Struct, kw_only=True):
    """One input's vector: floats, or (``encoding_format: base64``) its little-endian float32
    bytes in base64, as OpenAI sends them."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(Struct, kw_only=True):
    """The tokens embedded (every input's, special tokens included)."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(Struct, kw_only=True):
    """What ``/v1/embeddings`` answers: one ``Embedding`` per input, in input order."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
