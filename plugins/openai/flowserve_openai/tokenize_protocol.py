"""The bodies of vLLM's ``/tokenize`` and ``/detokenize`` (apart from their handlers, so that the
OpenAPI document can describe them)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

from flowserve_openai.protocol import MAX_TOOLS, MessageParam, TokenId
from flowserve_openai.protocol_tools import ToolParam


class TokenizeRequest(Struct, kw_only=True):
    """``POST /tokenize``: either ``prompt`` (vLLM's completion form) or ``messages`` (its chat
    form); ``return_token_strs`` adds each token's text."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[MessageParam], Meta(min_length=1)] | None = None
    tools: Annotated[list[ToolParam], Meta(max_length=MAX_TOOLS)] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(Struct, kw_only=True):
    """What ``/tokenize`` answers: the ids, their count and the deployment's context length."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(Struct, kw_only=True):
    """``POST /detokenize``: token ids of the model's vocabulary."""

    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(Struct, kw_only=True):
    """What ``/detokenize`` answers: the text of the tokens (special tokens skipped)."""

    prompt: str
