"""vLLM's ``POST /tokenize`` and ``POST /detokenize``, with its request and response shapes.

``/tokenize`` takes a ``prompt`` (tokenized as ``/v1/completions`` would, special tokens added
unless ``add_special_tokens`` is false) or chat ``messages`` and ``tools`` (rendered by the
model's chat template, ready for a reply, as ``/v1/chat/completions`` renders them); ``/detokenize`` turns
``tokens`` back into text. Tokenizing runs in a worker thread, on the lanes prompts use.
"""

from __future__ import annotations

import anyio
from starlette.requests import Request
from starlette.responses import Response

from flowserve_openai import tools
from flowserve_openai.context import AppContext
from flowserve_openai.errors import APIError
from flowserve_openai.prompts import chat_prompt, check_prompt_chars, message_list
from flowserve_openai.protocol import ChatCompletionRequest
from flowserve_openai.responses import json_response
from flowserve_openai.tokenize_protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse


async def tokenize(request: Request) -> Response:
    """``POST /tokenize``."""
    ctx: AppContext = request.app.state.flowserve
    body = await ctx.decode(request, TokenizeRequest)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "Give either prompt or messages (not both).", param="prompt", code="invalid_value")
    deployment = ctx.lookup(body.model)
    tokenizer = deployment.tokenizer
    if body.messages is not None:
        if not body.add_generation_prompt:
            raise APIError(400, "add_generation_prompt: false is not supported; chats are rendered ready for a "
                                "reply, as /v1/chat/completions renders them", param="add_generation_prompt",
                           code="unsupported_parameter")
        chat = ChatCompletionRequest(messages=body.messages, tools=body.tools)
        messages = message_list(body.messages)
        if tools.uses_tools(chat):
            ids = await tools.tool_chat_prompt(chat, messages, tokenizer, deployment.max_model_len, ctx.tokenizing)
        else:
            ids = await chat_prompt(messages, tokenizer, deployment.max_model_len, ctx.tokenizing)
    else:
        text = body.prompt or ""
        check_prompt_chars(len(text), deployment.max_model_len, "prompt")
        special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await ctx.tokenizing.run(len(text), lambda: tokenizer.encode(text, add_special_tokens=special))
    token_strs = [tokenizer.token_text(t) for t in ids] if body.return_token_strs else None
    return json_response(TokenizeResponse(count=len(ids), max_model_len=deployment.max_model_len, tokens=ids,
                                          token_strs=token_strs))


async def detokenize(request: Request) -> Response:
    """``POST /detokenize``."""
    ctx: AppContext = request.app.state.flowserve
    body = await ctx.decode(request, DetokenizeRequest)
    deployment = ctx.lookup(body.model)
    tokenizer = deployment.tokenizer
    if bad := [t for t in body.tokens if t >= tokenizer.vocab_size]:
        raise APIError(400, f"tokens holds the token id {bad[0]}, outside this model's vocabulary "
                            f"(0 to {tokenizer.vocab_size - 1})", param="tokens", code="invalid_value")
    text = await anyio.to_thread.run_sync(tokenizer.decode, body.tokens)
    return json_response(DetokenizeResponse(prompt=text))
