"""Choice events to OpenAI's response bodies: Server-Sent Event chunks while streaming, one
JSON document at the end otherwise. One renderer for completions, one for chat."""

from __future__ import annotations

from typing import Any

from msgspec import UNSET, UnsetType

from flowserve_core.types import TokenLogprob
from flowserve_openai.generation import ChoiceEvent
from flowserve_openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    FinishReason,
    PromptLogprob,
    PromptLogprobs,
    PromptTokensDetails,
    TopLogprob,
    Usage,
    encoder,
)
from flowserve_openai.sampling import ChoicePlan
from flowserve_openai.tools import ToolPlan, ToolStream, message_calls, read_reply

DONE = b"data: [DONE]\n\n"


def sse(payload: bytes) -> bytes:
    """One Server-Sent Event carrying ``payload`` (JSON)."""
    return b"data: " + payload + b"\n\n"


class Renderer:
    """What both renderers share: ids, usage accounting and per-choice accumulation."""

    def __init__(self, *, id: str, model: str, created: int, fingerprint: str, tokenizer: Any,
                 choices: list[ChoicePlan], prompt_lengths: list[int], logprobs: int | None,
                 include_usage: bool, prompt_logprobs: bool = False):
        self.id, self.model, self.created, self.fingerprint = id, model, created, fingerprint
        self.tokenizer = tokenizer
        self.plans = {plan.index: plan for plan in choices}
        self.prompt_lengths = prompt_lengths
        self.logprobs = logprobs
        self.include_usage = include_usage
        #: whether answers carry vLLM's ``prompt_logprobs`` field
        self.prompt_logprobs = prompt_logprobs
        #: each choice's scored prompt (tokens 1..), once its first event brought it
        self.scored: dict[int, list[TokenLogprob]] = {}
        self.text = {index: "" for index in self.plans}
        self.tokens = {index: 0 for index in self.plans}
        self.finish: dict[int, FinishReason | None] = {index: None for index in self.plans}
        self.cached = {index: 0 for index in self.plans}

    def usage(self) -> Usage:
        """Token counts so far: every prompt once, every choice's output; a prompt's cached
        tokens are the most any of its choices found in the prefix cache."""
        prompt, completion = sum(self.prompt_lengths), sum(self.tokens.values())
        per_prompt: dict[int, int] = {}
        for index, plan in self.plans.items():
            per_prompt[plan.prompt_index] = max(per_prompt.get(plan.prompt_index, 0), self.cached[index])
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(per_prompt.values())))

    def _account(self, event: ChoiceEvent) -> None:
        if event.prompt_logprobs is not None:
            self.scored[event.index] = event.prompt_logprobs
        self.cached[event.index] = max(self.cached[event.index], event.cached_tokens)
        self.tokens[event.index] += len(event.token_ids)
        self.text[event.index] += event.text
        self.finish[event.index] = event.finish_reason or self.finish[event.index]

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id)

    def _vllm_prompt_logprobs(self, index: int) -> PromptLogprobs | UnsetType:
        """vLLM's ``prompt_logprobs`` of choice ``index``: None for the first prompt token, then
        each token's entry and its alternatives' (keyed by token id)."""
        if not self.prompt_logprobs:
            return UNSET
        out: PromptLogprobs = [None]
        for entry in self.scored.get(index, []):
            alternatives = {alt.token_id: PromptLogprob(logprob=alt.logprob, rank=rank,
                                                        decoded_token=self._token_text(alt.token_id))
                            for rank, alt in enumerate(entry.top, start=1)}
            alternatives.setdefault(entry.token_id, PromptLogprob(
                logprob=entry.logprob, rank=entry.rank or None, decoded_token=self._token_text(entry.token_id)))
            out.append(alternatives)
        return out

    def _chunk_usage(self) -> Any:
        return None if self.include_usage else UNSET

    def opening(self) -> list[bytes]:
        """Chunks sent as soon as the stream starts."""
        return []

    def closing(self) -> list[bytes]:
        """Chunks sent after every choice ended (before ``[DONE]``)."""
        return [sse(encoder.encode(self._usage_chunk()))] if self.include_usage else []

    def _usage_chunk(self) -> Any:
        raise NotImplementedError


class CompletionRenderer(Renderer):
    """``/v1/completions``: legacy logprobs (``tokens``, ``token_logprobs``, ``top_logprobs``,
    ``text_offset``), echo of the prompt."""

    def __init__(self, echo_only: bool = False, **kw: Any):
        super().__init__(**kw)
        #: ``max_tokens: 0`` with ``echo``: the prompt is the whole answer (the token made is dropped)
        self.echo_only = echo_only
        self.collected = {index: CompletionLogprobs() for index in self.plans}
        self.offsets = {index: len(plan.echo_text) for index, plan in self.plans.items()}
        #: streaming: choices whose echo chunk is out (with logprobs it waits for the prompt's scores)
        self.echoed: set[int] = set()

    def _legacy(self, index: int, token_ids: list[int], logprobs: list[TokenLogprob] | None) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for i, token_id in enumerate(token_ids):
            text = self._token_text(token_id)
            entry = logprobs[i] if logprobs is not None and i < len(logprobs) else None
            out.tokens.append(text)
            out.token_logprobs.append(entry.logprob if entry else None)
            out.top_logprobs.append(
                {self._token_text(t.token_id): t.logprob for t in entry.top[:self.logprobs]} if entry else None)
            out.text_offset.append(self.offsets[index])
            self.offsets[index] += len(text)
        return out

    def _echo_logprobs(self, plan: ChoicePlan) -> CompletionLogprobs:
        """Prompt tokens of an echoed prompt: their texts and logprobs (the first has none)."""
        out, offset = CompletionLogprobs(), 0
        scored: list[TokenLogprob | None] = [None, *self.scored.get(plan.index, [])]
        for i, token_id in enumerate(plan.prompt_token_ids):
            text = self._token_text(token_id)
            entry = scored[i] if i < len(scored) else None
            out.tokens.append(text)
            out.token_logprobs.append(entry.logprob if entry else None)
            out.top_logprobs.append(
                {self._token_text(t.token_id): t.logprob for t in entry.top[:self.logprobs]} if entry else None)
            out.text_offset.append(offset)
            offset += len(text)
        return out

    def _visible(self, event: ChoiceEvent) -> ChoiceEvent:
        """What of ``event`` the answer shows: with ``echo_only``, nothing generated."""
        if not self.echo_only:
            return event
        return ChoiceEvent(event.index, finish_reason="length" if event.finish_reason else None,
                           cached_tokens=event.cached_tokens, prompt_logprobs=event.prompt_logprobs)

    def _echo_chunk(self, index: int) -> list[bytes]:
        plan = self.plans[index]
        self.echoed.add(index)
        if not plan.echo_text:
            return []
        logprobs = self._echo_logprobs(plan) if self.logprobs is not None else None
        return [self._chunk([CompletionChoice(index=index, text=plan.echo_text, logprobs=logprobs)],
                            self._chunk_usage())]

    def _merge(self, into: CompletionLogprobs, more: CompletionLogprobs) -> None:
        into.tokens += more.tokens
        into.token_logprobs += more.token_logprobs
        into.top_logprobs += more.top_logprobs
        into.text_offset += more.text_offset

    def _chunk(self, choices: list[CompletionChoice], usage: Any) -> bytes:
        return sse(encoder.encode(Completion(id=self.id, created=self.created, model=self.model,
                                             system_fingerprint=self.fingerprint, choices=choices, usage=usage)))

    def opening(self) -> list[bytes]:
        """An echo chunk per choice when ``echo`` is on (with logprobs: once the prompt is scored,
        which comes with the choice's first event)."""
        if self.logprobs is not None:
            return []
        return [chunk for index in sorted(self.plans) for chunk in self._echo_chunk(index)]

    def chunks(self, event: ChoiceEvent) -> list[bytes]:
        """The SSE chunks for ``event`` while streaming."""
        event = self._visible(event)
        self._account(event)
        chunks = self._echo_chunk(event.index) if event.index not in self.echoed else []
        logprobs = self._legacy(event.index, event.token_ids, event.logprobs) if self.logprobs is not None else None
        if not (event.text or event.finish_reason or (logprobs and logprobs.tokens)):
            return chunks  # text held back (e.g. a possible stop string) and nothing else to say
        return chunks + [self._chunk([CompletionChoice(index=event.index, text=event.text, logprobs=logprobs,
                                                       finish_reason=event.finish_reason)], self._chunk_usage())]

    def add(self, event: ChoiceEvent) -> None:
        """Collect ``event`` for the single JSON answer."""
        event = self._visible(event)
        self._account(event)
        if self.logprobs is not None:
            self._merge(self.collected[event.index], self._legacy(event.index, event.token_ids, event.logprobs))

    def body(self) -> bytes:
        """The whole completion as JSON (not streamed)."""
        choices = []
        for index, plan in sorted(self.plans.items()):
            logprobs = None
            if self.logprobs is not None:
                logprobs = self._echo_logprobs(plan) if plan.echo_text else CompletionLogprobs()
                self._merge(logprobs, self.collected[index])
            choices.append(CompletionChoice(index=index, text=plan.echo_text + self.text[index],
                                            logprobs=logprobs, finish_reason=self.finish[index],
                                            prompt_logprobs=self._vllm_prompt_logprobs(index)))
        return encoder.encode(Completion(id=self.id, created=self.created, model=self.model,
                                         system_fingerprint=self.fingerprint, choices=choices, usage=self.usage()))

    def _usage_chunk(self) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model,
                          system_fingerprint=self.fingerprint, choices=[], usage=self.usage())


class ChatRenderer(Renderer):
    """``/v1/chat/completions``: a role chunk per choice first, content deltas, an empty
    delta with the finish reason last; logprobs as ``logprobs.content[…]``. With ``tools``, each
    reply is read as ``tools.py`` says (content and ``tool_calls``; finish reason ``tool_calls``
    when the model called one)."""

    def __init__(self, tools: ToolPlan | None = None, **kw: Any):
        super().__init__(**kw)
        self.collected: dict[int, list[ChatTokenLogprob]] = {index: [] for index in self.plans}
        self.tools = tools
        self.streams = {index: ToolStream(tools) for index in self.plans} if tools is not None else {}

    def _entries(self, token_ids: list[int], logprobs: list[TokenLogprob] | None) -> list[ChatTokenLogprob]:
        entries = []
        for i, token_id in enumerate(token_ids):
            entry = logprobs[i] if logprobs is not None and i < len(logprobs) else None
            if entry is None:
                continue  # the executor computed none for this token
            text = self._token_text(token_id)
            top = [TopLogprob(token=(t := self._token_text(alt.token_id)), logprob=alt.logprob,
                              bytes=list(t.encode("utf-8")))
                   for alt in entry.top[:self.logprobs]]
            entries.append(ChatTokenLogprob(token=text, logprob=entry.logprob,
                                            bytes=list(text.encode("utf-8")), top_logprobs=top))
        return entries

    def _chunk(self, choices: list[ChatChunkChoice], usage: Any = None) -> bytes:
        return sse(encoder.encode(ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, system_fingerprint=self.fingerprint,
            choices=choices, usage=self._chunk_usage() if usage is None else usage)))

    def opening(self) -> list[bytes]:
        """A role chunk per choice."""
        return [self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
                for index in sorted(self.plans)]

    def chunks(self, event: ChoiceEvent) -> list[bytes]:
        """A content chunk for new text (or logprobs), a finish chunk at the end."""
        self._account(event)
        chunks = []
        logprobs = None
        if self.logprobs is not None:
            logprobs = ChatLogprobs(content=self._entries(event.token_ids, event.logprobs))
        finish = event.finish_reason
        if self.tools is None:
            deltas = [ChatDelta(content=event.text)] if event.text or (logprobs and logprobs.content) else []
        else:
            stream = self.streams[event.index]
            deltas = stream.push(event.text)
            if finish:
                more, called = stream.finish()
                deltas += more
                finish = "tool_calls" if called and finish == "stop" else finish
        if not deltas and logprobs is not None and logprobs.content:
            deltas = [ChatDelta()]
        for i, delta in enumerate(deltas):
            chunks.append(self._chunk([ChatChunkChoice(index=event.index, delta=delta,
                                                       logprobs=logprobs if i == 0 else None)]))
        if finish:
            chunks.append(self._chunk([ChatChunkChoice(index=event.index, delta=ChatDelta(), finish_reason=finish)]))
        return chunks

    def add(self, event: ChoiceEvent) -> None:
        """Collect ``event`` for the single JSON answer."""
        self._account(event)
        if self.logprobs is not None:
            self.collected[event.index] += self._entries(event.token_ids, event.logprobs)

    def body(self) -> bytes:
        """The whole chat completion as JSON (not streamed)."""
        wants_logprobs = self.logprobs is not None
        choices = []
        for index in sorted(self.plans):
            message, finish = AssistantMessage(content=self.text[index]), self.finish[index]
            if self.tools is not None:
                reply = read_reply(self.tools, self.text[index])
                message = AssistantMessage(content=reply.content)
                if reply.tool_calls:
                    message.tool_calls = message_calls(reply.tool_calls)
                    finish = "tool_calls" if finish == "stop" else finish
            choices.append(ChatChoice(index=index, message=message, finish_reason=finish,
                                      logprobs=ChatLogprobs(content=self.collected[index]) if wants_logprobs else None))
        # vLLM's prompt_logprobs of a chat: the prompt is every choice's, scored alike
        return encoder.encode(ChatCompletion(id=self.id, created=self.created, model=self.model,
                                             system_fingerprint=self.fingerprint, choices=choices, usage=self.usage(),
                                             prompt_logprobs=self._vllm_prompt_logprobs(min(self.plans))))

    def _usage_chunk(self) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   system_fingerprint=self.fingerprint, choices=[], usage=self.usage())
