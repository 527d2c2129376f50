"""Prompts to token ids: completion prompts in their four forms, chat messages through the
deployment tokenizer's chat template. Tokenizing runs in a worker thread (it is compute)."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import anyio

from flowserve_core.interfaces import ChatMessage
from flowserve_openai.errors import APIError
from flowserve_openai.protocol import MAX_PROMPTS, ROLES, ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)


async def completion_prompts(body: CompletionRequest, tokenizer: Any) -> list[tuple[list[int], str]]:
    """``(token ids, echo text)`` per prompt of ``body.prompt`` (a string, strings, token ids
    or lists of token ids); the echo text is only computed when ``echo`` asks for it."""
    prompt = body.prompt
    texts: list[str] | None = None
    token_lists: list[list[int]] = []
    if isinstance(prompt, str):
        texts = [prompt]
    elif not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    elif all(isinstance(p, str) for p in prompt):
        texts = list(prompt)  # type: ignore[arg-type]
    elif all(isinstance(p, int) for p in prompt):
        token_lists = [list(prompt)]  # type: ignore[arg-type]
    elif all(isinstance(p, list) for p in prompt):
        token_lists = [list(p) for p in prompt]  # type: ignore[union-attr]
    else:
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a "
                            "list of lists of token ids, not a mix of them", param="prompt", code="invalid_value")
    count = len(texts) if texts is not None else len(token_lists)
    if count > MAX_PROMPTS:
        raise APIError(400, f"prompt holds {count} prompts; at most {MAX_PROMPTS} are allowed in one call",
                       param="prompt", code="invalid_value")
    if texts is not None:
        token_lists = await anyio.to_thread.run_sync(lambda: [tokenizer.encode(t) for t in texts])
        echoes = texts
    else:
        _check_token_ids(token_lists, tokenizer.vocab_size)
        echoes = (await anyio.to_thread.run_sync(lambda: [tokenizer.decode(ids) for ids in token_lists])
                  if body.echo else [""] * len(token_lists))
    for i, ids in enumerate(token_lists):
        if not ids:
            param = "prompt" if len(token_lists) == 1 else f"prompt[{i}]"
            raise APIError(400, f"{param} is empty (no tokens); give the model something to continue",
                           param=param, code="invalid_value")
    return list(zip(token_lists, echoes if body.echo else [""] * len(token_lists)))


def _check_token_ids(token_lists: list[list[int]], vocab_size: int) -> None:
    for i, ids in enumerate(token_lists):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            param = "prompt" if len(token_lists) == 1 else f"prompt[{i}]"
            raise APIError(400, f"{param} holds the token id {bad}, outside this model's vocabulary "
                                f"(0 to {vocab_size - 1})", param=param, code="invalid_value")


def chat_messages(body: ChatCompletionRequest) -> list[ChatMessage]:
    """The kernel's ``ChatMessage`` list: text parts joined by newlines, ``developer`` read
    as ``system``, an assistant's null content as empty."""
    messages = []
    for message in body.messages:
        content = message.content
        if content is None:
            content = ""
        elif not isinstance(content, str):
            content = "\n".join(part.text for part in content)
        messages.append(ChatMessage(role=ROLES[type(message)], content=content))
    return messages


async def chat_prompt(messages: Sequence[ChatMessage], tokenizer: Any) -> list[int]:
    """Token ids of ``messages`` rendered by the model's chat template, ready for a reply."""
    try:
        ids = await anyio.to_thread.run_sync(tokenizer.apply_chat_template, list(messages))
    except Exception as exc:  # a template refusing the conversation (e.g. roles out of order)
        log.debug("chat template failed", exc_info=True)
        raise APIError(400, f"The model's chat template rejected these messages: {exc}",
                       param="messages", code="invalid_value") from None
    if not ids:
        raise APIError(400, "messages render to an empty prompt", param="messages", code="invalid_value")
    return list(ids)
