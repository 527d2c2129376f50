"""The Protocols that plugin components implement. Public API, like the hookspecs.

Structural typing: a component need not inherit from these; it must have the members.
Methods marked optional in their docstring may be absent; callers check with ``hasattr``.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Protocol, Sequence, runtime_checkable

import msgspec

from flowserve_core.types import (InstanceInfo, InstanceStats, Job, KVCacheSpec, KVHandoff, KVUsage, Request,
                                  SamplingParams, SchedulerStats, StepBatch, StepResult, Task, TokenEvent)

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment, InstancePool


class ChatMessage(msgspec.Struct, kw_only=True):
    """One chat turn as a chat template sees it."""

    role: str
    content: str


class TextDelta(msgspec.Struct, kw_only=True):
    """New text decoded from new tokens; ``stopped`` when a stop string matched."""

    text: str = ""
    stopped: bool = False


@runtime_checkable
class IncrementalDetokenizer(Protocol):
    """Turns a stream of token ids into text deltas for one output sequence.

    Never emits half a UTF-8 character or a text that a stop string may still swallow:
    ambiguous text is held back until it is decided, and flushed by ``finish``.
    """

    def push(self, token_ids: Sequence[int]) -> TextDelta: ...

    def finish(self) -> str: ...


@runtime_checkable
class Tokenizer(Protocol):
    """Text ↔ token ids for one model, its chat template and its end-of-sequence ids.

    Optional attribute ``max_model_len``: the model's context length, which the server uses
    to refuse prompts that cannot fit before any instance is running.
    """

    eos_token_ids: list[int]
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of ``messages`` rendered with the model's template, ready for a reply."""

    def token_text(self, token_id: int) -> str:
        """The text of one token as OpenAI's logprobs show it."""

    def detokenizer(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> IncrementalDetokenizer: ...


@runtime_checkable
class Executor(Protocol):
    """Runs the model: one ``StepBatch`` in, one sampled token per sampling sequence out.

    Blocking compute happens off the event loop (a thread or worker processes). Raising
    ``EngineDeadError`` means the executor can run nothing more (a worker process died).
    Optional: ``export_kv(block_ids) -> bytes`` and ``import_kv(block_ids, data)`` for
    moving KV blocks between instances, and ``close()``.
    """

    def kv_cache_spec(self) -> KVCacheSpec: ...

    async def execute(self, batch: StepBatch) -> StepResult: ...


@runtime_checkable
class KVCacheManager(Protocol):
    """Bookkeeping of the executor's KV blocks: which sequence owns which, what is cached.

    A block is shared (ref count > 1) only while no one writes it; full blocks are
    registered under a hash chained over every token before them, so a new sequence with
    the same prefix reuses them (``allocate`` returns how many prompt tokens it found).
    """

    block_size: int

    def allocate(self, seq_id: str, token_ids: Sequence[int]) -> int | None:
        """Give ``seq_id`` blocks for ``token_ids``; the number of leading tokens already
        cached, or None (nothing allocated) when there are not enough free blocks."""

    def append_slots(self, seq_id: str, num_tokens: int) -> bool:
        """Make room for ``seq_id`` to hold ``num_tokens`` tokens in all; False if out of blocks."""

    def commit(self, seq_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """The first ``num_computed`` tokens are now in the cache: register full blocks' hashes."""

    def free(self, seq_id: str) -> None: ...

    def fork(self, parent_seq_id: str, child_seq_id: str) -> None: ...

    def block_table(self, seq_id: str) -> list[int]: ...

    def num_cached_tokens(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens of ``token_ids`` are cached here (routing; no side effect)."""

    def usage(self) -> KVUsage: ...


@runtime_checkable
class BatchScheduler(Protocol):
    """Decides what each engine step runs; owns the sequences and the KV cache manager.

    ``add``/``abort`` are called between steps; ``add`` raises ``ValueError`` for a task that
    can never run here (e.g. longer than the whole KV cache), which fails that task.
    ``schedule`` must make progress whenever ``has_work()`` (preempt rather than deadlock);
    ``update`` turns the executor's result into one ``TokenEvent`` per sequence that produced a
    token or ended; ``abort`` returns the aborted task's last event (None if unknown).
    """

    def add(self, task: Task) -> None: ...

    def abort(self, task_id: str) -> TokenEvent | None: ...

    def has_work(self) -> bool: ...

    def schedule(self) -> StepBatch: ...

    def update(self, batch: StepBatch, result: StepResult) -> list[TokenEvent]: ...

    def stats(self) -> SchedulerStats: ...

    def kv_usage(self) -> KVUsage: ...


class TaskStream(Protocol):
    """The events of one task on one instance. Leaving the ``async with`` early aborts it."""

    def __aiter__(self) -> AsyncIterator[TokenEvent]: ...


@runtime_checkable
class Instance(Protocol):
    """A handle on one engine instance, in this process or another. Scalers create them
    (flowserve-prewarm-scaler's ``InstanceBase`` is a ready base class)."""

    info: InstanceInfo
    stats: InstanceStats

    def submit(self, task: Task) -> AbstractAsyncContextManager[TaskStream]: ...

    async def stop(self) -> None: ...


EmitEvent = Callable[[TokenEvent], Awaitable[None]]


@runtime_checkable
class JobScheduler(Protocol):
    """Turns a request into a job of tasks and runs them on the deployment's instances.

    ``run_job`` places each task (``pool.wait_ready(role)`` gives candidates), submits it,
    forwards every event to ``emit`` and retries or fails tasks whose instance died. It is
    cancelled when the client goes away; leaving a task stream aborts that task.
    """

    def make_job(self, request: Request) -> Job: ...

    async def run_job(self, job: Job, pool: InstancePool, emit: EmitEvent) -> None: ...


@runtime_checkable
class Scaler(Protocol):
    """Starts and stops a deployment's instances. ``run`` lives as long as the deployment.

    ``set_target`` is the manual override (admin API); ``on_demand`` tells that a request is
    waiting for an instance of ``role`` (scale from zero). ``run`` must stop every instance it
    started when cancelled, and start none once ``deployment.stopping`` is set.
    """

    async def run(self, deployment: Deployment) -> None: ...

    def set_target(self, instances: int) -> None: ...

    def on_demand(self, role: Any) -> None: ...


@runtime_checkable
class KVTransport(Protocol):
    """Moves exported KV bytes from a prefill instance to a decode instance.

    Threads: the decode side calls ``fetch`` and ``release`` from worker threads, several at
    once (they may wait; the engine's event loop goes on stepping), so both must be
    thread-safe. ``publish`` runs on the prefill instance's event loop, inside its step: it
    should return quickly (``shm`` writes a file; ``ray`` puts the bytes in the object store)."""

    def publish(self, data: bytes | memoryview, key: str) -> str:
        """Make ``data`` fetchable; return the locator to put in a ``KVHandoff``."""

    def fetch(self, handoff: KVHandoff) -> memoryview:
        """The bytes ``handoff.locator`` names (a worker thread; may block until they are there)."""

    def release(self, locator: str) -> None:
        """The decode side is done with ``locator``'s bytes: free them (a worker thread)."""


@runtime_checkable
class Frontend(Protocol):
    """The API a server speaks; ``serve`` runs until cancelled or the server shuts down."""

    async def serve(self, server: Any) -> None: ...

