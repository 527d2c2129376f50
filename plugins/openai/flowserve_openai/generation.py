"""Running one API call's choices through the kernel, one request per choice.

Each choice is a ``Request`` opened on the deployment (``async with deployment.open(…)``)
in its own task; its token events pass through the tokenizer's incremental detokenizer and
come out as ``ChoiceEvent``s, in the order they happen, to the renderer that writes the
response. Every choice is admitted before the response starts, so a full queue is a 429
rather than a broken stream. Leaving early — a stop string matched, another choice failed,
the client went away — leaves the request's ``async with``, which aborts its task on the
engine.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from flowserve_core.errors import RejectedError
from flowserve_core.interfaces import IncrementalDetokenizer, TextDelta
from flowserve_core.types import Request, TokenLogprob
from flowserve_openai.errors import APIError
from flowserve_openai.protocol import FinishReason
from flowserve_openai.sampling import ChoicePlan

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment


@dataclass
class ChoiceEvent:
    """New output of one choice: text, the tokens behind it, and at the end why it stopped
    (``finish_reason``) or what broke (``error``)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    #: prompt tokens the engine found in its prefix cache (so far)
    cached_tokens: int = 0
    #: with the choice's first tokens, when the prompt is scored: prompt tokens 1.. scored
    prompt_logprobs: list[TokenLogprob] | None = None


OnStarted = Callable[[], Awaitable[None]]
OnEvent = Callable[[ChoiceEvent], Awaitable[None]]


class Generation:
    """The choices of one call on one deployment; ``run`` drives them to the end."""

    def __init__(self, deployment: Deployment, choices: list[ChoicePlan], metrics: Any = None,
                 arrival_time: float | None = None):
        self.deployment = deployment
        self.choices = choices
        self.metrics = metrics
        #: ``time.time()`` when the HTTP request came in (default: now)
        self.arrival_time = time.time() if arrival_time is None else arrival_time

    async def run(self, on_started: OnStarted, on_event: OnEvent) -> APIError | None:
        """Admit every choice, call ``on_started``, then ``on_event`` for each event until
        all choices end. Returns the error that ended the call early (a rejection before
        ``on_started``, or a failed choice after), or None."""
        send, receive = anyio.create_memory_object_stream[ChoiceEvent](math.inf)
        failure: APIError | None = None
        async with anyio.create_task_group() as tg:
            with send:
                for choice in self.choices:
                    failure = await tg.start(self._run_choice, choice, send.clone())
                    if failure is not None:
                        break
            if failure is not None:
                tg.cancel_scope.cancel()
            else:
                await on_started()
                with receive:
                    async for event in receive:
                        if event.error is not None:
                            failure = APIError(500, event.error, code="engine_error")
                            tg.cancel_scope.cancel()
                            break
                        await on_event(event)
        return failure

    async def _run_choice(self, choice: ChoicePlan, events: MemoryObjectSendStream[ChoiceEvent], *,
                          task_status: Any) -> None:
        tokenizer = self.deployment.tokenizer
        request = Request(prompt_token_ids=choice.prompt_token_ids, params=choice.params,
                          eos_token_ids=list(tokenizer.eos_token_ids), model=self.deployment.name,
                          arrival_time=self.arrival_time)
        handle = None
        latencies: list[float] = []
        if self.deployment.stopping:  # removed after the lookup: as if it had not been found
            events.close()
            task_status.started(APIError(404, f"The model {self.deployment.name!r} was removed.",
                                         param="model", code="model_not_found"))
            return
        with events:
            try:
                async with self.deployment.open(request) as handle:
                    task_status.started(None)
                    await self._stream(choice, handle, events, latencies)
            except RejectedError as exc:
                if handle is not None:
                    raise
                task_status.started(APIError.from_rejection(exc.rejection))
            finally:
                if handle is not None and self.metrics is not None:
                    self.metrics.request_finished(self.deployment.name, handle, latencies)

    async def _stream(self, choice: ChoicePlan, handle: Any, events: MemoryObjectSendStream[ChoiceEvent],
                      latencies: list[float]) -> None:
        detokenizer = self.deployment.tokenizer.detokenizer(choice.prompt_token_ids, choice.params)
        last_token_at: float | None = None
        async for event in handle:
            cached = handle.output.num_cached_tokens
            if event.token_ids:
                now = time.monotonic()
                if last_token_at is not None:
                    latencies.extend([(now - last_token_at) / len(event.token_ids)] * len(event.token_ids))
                last_token_at = now
                delta, taken = _push(detokenizer, event.token_ids)
                if delta.stopped:
                    # A stop string matched in the text: end here, with the tokens up to the
                    # one that completed it; leaving the `async with` aborts the task.
                    handle.finished_early("stop")
                    logprobs = event.logprobs[:taken] if event.logprobs else event.logprobs
                    await events.send(ChoiceEvent(choice.index, delta.text, list(event.token_ids[:taken]),
                                                  logprobs, finish_reason="stop", cached_tokens=cached,
                                                  prompt_logprobs=event.prompt_logprobs))
                    return
                text = delta.text
            else:
                text = ""
            if event.finish_reason in ("stop", "length"):
                text += detokenizer.finish()
                await events.send(ChoiceEvent(choice.index, text, list(event.token_ids), event.logprobs,
                                              finish_reason=event.finish_reason, cached_tokens=cached,
                                              prompt_logprobs=event.prompt_logprobs))
                return
            if event.finish_reason is not None:
                reason = event.error or f"the engine ended the request ({event.finish_reason})"
                await events.send(ChoiceEvent(choice.index, error=reason))
                return
            if text or event.token_ids:
                await events.send(ChoiceEvent(choice.index, text, list(event.token_ids), event.logprobs,
                                              cached_tokens=cached, prompt_logprobs=event.prompt_logprobs))
        await events.send(ChoiceEvent(choice.index, error="the request ended without a finish reason"))


def _push(detokenizer: IncrementalDetokenizer, token_ids: list[int]) -> tuple[TextDelta, int]:
    """Decode an event's tokens: the new text and how many tokens it took, all of them unless
    a stop string matched. An event of several tokens (multi-step decoding) is decoded token
    by token, so that a stop string ends the output at the token that completed it."""
    if len(token_ids) == 1:
        return detokenizer.push(token_ids), 1
    text = []
    for taken, token in enumerate(token_ids, 1):
        delta = detokenizer.push([token])
        text.append(delta.text)
        if delta.stopped:
            return TextDelta(text="".join(text), stopped=True), taken
    return TextDelta(text="".join(text)), len(token_ids)
