"""Prompts to token ids: completion prompts in their four forms, chat messages through the
deployment tokenizer's chat template. Tokenizing runs in a worker thread (it is compute).

A prompt too long for the context is refused before it is tokenized, by its length in
characters: no token of a usual vocabulary is longer than ``MAX_CHARS_PER_TOKEN`` characters
(SmolLM2's longest is 81), so a text longer than that many characters per token of
``max_model_len`` cannot fit. Long prompts that pass are tokenized on a lane of their own, one
at a time (``TokenizingLanes``), so a flood of them queues behind itself, not in front of
everyone's short prompts (issue 20).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence, TypeVar

import anyio

from flowserve_core.interfaces import ChatMessage
from flowserve_openai.errors import APIError
from flowserve_openai.protocol import MAX_PROMPTS, ROLES, ChatCompletionRequest, CompletionRequest, MessageParam

T = TypeVar("T")

log = logging.getLogger(__name__)

#: The most characters one token is taken to stand for when refusing a prompt unread.
MAX_CHARS_PER_TOKEN = 128
#: Prompts (or chats) longer than this many characters are tokenized on the bulk lane.
BULK_PROMPT_CHARS = 32_768


class TokenizingLanes:
    """Where prompts are tokenized: short ones on anyio's worker threads, long ones (past
    ``BULK_PROMPT_CHARS``) on a lane of ``bulk_threads`` threads, one app-wide."""

    def __init__(self, bulk_threads: int = 1):
        self.bulk = anyio.CapacityLimiter(bulk_threads)

    async def run(self, chars: int, work: Callable[[], T]) -> T:
        """``work()`` in a worker thread of the lane that ``chars`` characters belong to."""
        return await anyio.to_thread.run_sync(work, limiter=self.bulk if chars > BULK_PROMPT_CHARS else None)


def check_prompt_chars(chars: int, max_model_len: int, what: str) -> None:
    """A 400 before tokenizing when ``chars`` characters cannot fit in ``max_model_len`` tokens."""
    limit = max_model_len * MAX_CHARS_PER_TOKEN
    if chars > limit:
        raise APIError(
            400, f"This model's maximum context length is {max_model_len} tokens. However, your {what} "
                 f"holds {chars} characters, more than {max_model_len} tokens can hold ({limit}, at most "
                 f"{MAX_CHARS_PER_TOKEN} characters a token). Please reduce the length of the {what}.",
            param=what, code="context_length_exceeded")


async def completion_prompts(body: CompletionRequest, tokenizer: Any, max_model_len: int,
                             lanes: TokenizingLanes) -> list[tuple[list[int], str]]:
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
        texts = [p for p in prompt if isinstance(p, str)]
    elif all(isinstance(p, int) for p in prompt):
        token_lists = [[p for p in prompt if isinstance(p, int)]]
    elif all(isinstance(p, list) for p in prompt):
        token_lists = [list(p) for p in prompt if isinstance(p, list)]
    else:
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a "
                            "list of lists of token ids, not a mix of them", param="prompt", code="invalid_value")
    count = len(texts) if texts is not None else len(token_lists)
    if count > MAX_PROMPTS:
        raise APIError(400, f"prompt holds {count} prompts; at most {MAX_PROMPTS} are allowed in one call",
                       param="prompt", code="invalid_value")
    if texts is not None:
        for i, text in enumerate(texts):
            check_prompt_chars(len(text), max_model_len, "prompt" if len(texts) == 1 else f"prompt[{i}]")
        token_lists = await lanes.run(sum(map(len, texts)), lambda: [tokenizer.encode(t) for t in texts])
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
    """The kernel's ``ChatMessage`` list of a chat request (see ``message_list``)."""
    return message_list(body.messages)


def message_list(params: Sequence[MessageParam]) -> list[ChatMessage]:
    """The kernel's ``ChatMessage`` list: text parts joined by newlines, ``developer`` read
    as ``system``, an assistant's null content as empty."""
    messages = []
    for message in params:
        content = message.content
        if content is None:
            content = ""
        elif not isinstance(content, str):
            content = "\n".join(part.text for part in content)
        messages.append(ChatMessage(role=ROLES[type(message)], content=content))
    return messages


async def chat_prompt(messages: Sequence[ChatMessage], tokenizer: Any, max_model_len: int,
                      lanes: TokenizingLanes) -> list[int]:
    """Token ids of ``messages`` rendered by the model's chat template, ready for a reply."""
    chars = sum(len(m.content) for m in messages)
    check_prompt_chars(chars, max_model_len, "messages")
    try:
        ids = await lanes.run(chars, lambda: tokenizer.apply_chat_template(list(messages)))
    except Exception as exc:  # a template refusing the conversation (e.g. roles out of order)
        log.debug("chat template failed", exc_info=True)
        raise APIError(400, f"The model's chat template rejected these messages: {exc}",
                       param="messages", code="invalid_value") from None
    if not ids:
        raise APIError(400, "messages render to an empty prompt", param="messages", code="invalid_value")
    return list(ids)
