"""The Protocols that plugin components implement (public API, like the hookspecs). A component
need not inherit from them; it must have the members, and keep the rules its Protocol's
docstring states.

A component that can do more than its Protocol asks says so by having the members of a small
``runtime_checkable`` Protocol of its own (``BlockCopySource``, ``AdmissionControl``, ...); its
caller checks with ``isinstance``, never with ``hasattr`` or ``getattr``, so each capability is
declared once, with its signature, here."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Protocol,
    Sequence,
    runtime_checkable,
)

import anyio
import msgspec
from anyio.abc import TaskStatus

from flowserve_core.types import (
    DeploymentSpec,
    InstanceInfo,
    InstanceStats,
    Job,
    KVCacheSpec,
    KVHandoff,
    KVUsage,
    Rejection,
    Request,
    RequestOutput,
    SamplingParams,
    SchedulerStats,
    StepBatch,
    StepResult,
    Task,
    TaskRole,
    TokenEvent,
)

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment, InstancePool
    from flowserve_core.server import Server


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
    """Token ids → text deltas for one output sequence. It never emits half a UTF-8 character,
    nor text that a stop string may still swallow: ambiguous text is held back until it is
    decided, and ``finish`` flushes it."""

    def push(self, token_ids: Sequence[int]) -> TextDelta: ...

    def finish(self) -> str: ...


@runtime_checkable
class Tokenizer(Protocol):
    """Text ↔ token ids for one model, its chat template and end-of-sequence ids. The optional
    attribute ``max_model_len`` (``ReportsContextLength``) is the model's context length: the
    server uses it to refuse prompts that cannot fit before any instance is running."""

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
    ``EngineDeadError`` means the executor can run nothing more (a worker process died); every
    live task of the instance then fails. KV blocks move between instances (PD-disaggregation)
    inside a step: the executor writes ``StepBatch.kv_imports`` before computing and returns
    the blocks ``StepBatch.kv_exports`` asks for in ``StepResult.kv_exports``. Optional:
    ``close()`` (``ClosableExecutor``), ``weights_path`` (``ReportsWeightsPath``) and
    ``end_step_early()`` (``EndsStepsEarly``); its
    factory may offer fast-start steps (``FastStartExecutorFactory``,
    ``DeviceSharingExecutorFactory``)."""

    def kv_cache_spec(self) -> KVCacheSpec: ...

    async def execute(self, batch: StepBatch) -> StepResult: ...


@runtime_checkable
class ClosableExecutor(Protocol):
    """Optional, for an executor that holds more than memory (worker processes, a device
    context): the instance calls ``close`` once, when it ends."""

    def close(self) -> None: ...


@runtime_checkable
class EndsStepsEarly(Protocol):
    """Optional, for an executor that decodes several tokens a step (``decode_steps``): the
    engine calls ``end_step_early`` (from the event loop, while a step may be in flight) when a
    task or an abort arrives, so the step returns after its current round with the tokens
    sampled so far, and the new work waits one round rather than the whole step."""

    def end_step_early(self) -> None: ...


@runtime_checkable
class ReportsWeightsPath(Protocol):
    """Optional, for an executor: how it got its weights, ``"loaded"`` or ``"preloaded"`` (by a
    ``preload`` or ``attach`` in its process or the one it was forked from); scalers report it."""

    @property
    def weights_path(self) -> str: ...


@runtime_checkable
class FastStartExecutorFactory(Protocol):
    """Optional, for an executor factory (the callable an executor plugin registers): steps a
    scaler may run in a process before the factory builds an executor there. Both block."""

    def prewarm(self, device: str = "auto") -> None:
        """Import the runtime and open ``device`` (``auto``: the best there is); no model yet."""

    def preload(self, spec: DeploymentSpec) -> str:
        """Load ``spec``'s weights here for the next executor of ``spec``, computing nothing
        (this process may fork next); what was loaded, for the log. Raises where it cannot."""


@runtime_checkable
class DeviceSharingExecutorFactory(Protocol):
    """Optional, for an executor factory on devices (CUDA, NPU), where a fork cannot share
    loaded weights: one process holds them (``share``), instance processes ``attach``."""

    def share(self, spec: DeploymentSpec) -> bytes:
        """Hold ``spec``'s model on its device in this process; the IPC handles for ``attach``."""

    def attach(self, spec: DeploymentSpec, handles: bytes) -> None:
        """Make this process's next executor of ``spec`` use the weights ``handles`` name."""


@runtime_checkable
class KVCacheManager(Protocol):
    """Bookkeeping of the executor's KV blocks: which sequence owns which, and which full
    blocks are cached for reuse.

    A block is shared (ref count > 1) only while no one writes it. Full blocks are registered
    under a hash chained over every token before them, so a new sequence with the same prefix
    reuses them: ``allocate`` returns how many prompt tokens it found cached. Optional:
    ``take_block_copies`` (``BlockCopySource``), ``allocate_uncached`` (``AllocatesUncached``),
    ``release_out_of_window`` (``ReleasesOutOfWindow``) and ``max_model_len``
    (``ReportsContextLength``)."""

    block_size: int

    def allocate(self, seq_id: str, token_ids: Sequence[int]) -> int | None:
        """Give ``seq_id`` blocks for ``token_ids``: how many leading tokens were cached, or None
        (nothing allocated) when blocks are short."""

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
class BlockCopySource(Protocol):
    """Optional, for a KV cache manager that copies blocks on write (``paged``): the batch
    scheduler passes the copies on in ``StepBatch.block_copies``."""

    def take_block_copies(self) -> list[tuple[int, int]]:
        """The ``(source, destination)`` copies asked for since the last call (then forgotten);
        the executor applies them before computing the step they were taken for."""


@runtime_checkable
class AllocatesUncached(Protocol):
    """Optional, for a KV cache manager with a prefix cache: blocks for a sequence that must
    compute every prompt position (prompt logprobs, mean pooling), so it takes no cached
    hits. A manager without it is asked ``allocate``; cached tokens are then recomputed."""

    def allocate_uncached(self, seq_id: str, token_ids: Sequence[int]) -> int | None:
        """As ``allocate``, reusing no cached block: 0, or None when blocks are short."""


@runtime_checkable
class ReleasesOutOfWindow(Protocol):
    """Optional, for a KV cache manager built with a ``KVCacheSpec.sliding_window``: the batch
    scheduler asks it, after each commit, to give back the blocks of a sequence that no layer
    reads again, so a long sliding-window sequence holds only its window. Not asked for a
    sequence whose blocks are exported afterwards (PD prefill)."""

    def release_out_of_window(self, seq_id: str) -> int:
        """Free the blocks wholly behind the window of ``seq_id``'s next query; how many."""


@runtime_checkable
class ReportsContextLength(Protocol):
    """Optional, for a tokenizer or KV cache manager: the model's context length, where known.
    The smallest one known (``DeploymentSpec.max_model_len`` first) bounds prompt and output."""

    @property
    def max_model_len(self) -> int | None: ...


@runtime_checkable
class BatchScheduler(Protocol):
    """Decides what each engine step runs; owns the sequences and the KV cache manager.

    ``add`` and ``abort`` are called between steps, never while a batch is in flight. ``add``
    raises ``ValueError`` for a task that can never run here (e.g. longer than the whole KV
    cache), which fails that task only. ``schedule`` must make progress whenever
    ``has_work()`` (preempt rather than deadlock). ``update`` turns the executor's result into
    one ``TokenEvent`` per sequence that produced a token or ended; ``abort`` returns the
    aborted task's last event (None if it does not know the task)."""

    def add(self, task: Task) -> None: ...

    def abort(self, task_id: str) -> TokenEvent | None: ...

    def has_work(self) -> bool: ...

    def schedule(self) -> StepBatch: ...

    def update(self, batch: StepBatch, result: StepResult) -> list[TokenEvent]: ...

    def stats(self) -> SchedulerStats: ...

    def kv_usage(self) -> KVUsage: ...


@runtime_checkable
class Instance(Protocol):
    """A handle on one engine instance, in this process or another; ``info`` and ``stats``
    are what the server last knew of it (flowserve-instance-runtime's ``InstanceBase`` is a
    ready base class).

    A scaler runs each instance it makes in a task of its own with
    ``deployment.pool.run(instance)`` (``task_group.start`` waits until it is ready): the pool
    sets ``on_change`` (the instance calls it whenever ``info.state`` changes, so waiting job
    schedulers look again), then awaits ``instance.run(task_status=...)``, which calls
    ``task_status.started()`` once the instance is ready and serves until it ends.
    ``Deployment.stop`` calls ``stop(drain_timeout)`` on every instance. Job schedulers read
    ``num_tasks`` to place by load, and ``stats`` (what the instance last reported)."""

    info: InstanceInfo
    stats: InstanceStats
    #: Set by the pool before ``run``: call it whenever ``info.state`` changes.
    on_change: Callable[[], None]

    @property
    def num_tasks(self) -> int:
        """Tasks submitted here that have not ended: the load job schedulers place by."""

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start the instance, call ``task_status.started()`` once it is ready, and serve until
        it ends (state ``gone``); ``InstancePool.run`` awaits it."""

    def submit(self, task: Task) -> AbstractAsyncContextManager[AsyncIterator[TokenEvent]]:
        """Run ``task`` here; iterate the stream for its events. Leaving early aborts it."""

    async def stop(self, drain_timeout: float = 0.0) -> None:
        """Take no new tasks, let those in flight finish for up to ``drain_timeout`` s, then end."""


EmitEvent = Callable[[TokenEvent], Awaitable[None]]


@runtime_checkable
class JobScheduler(Protocol):
    """Turns a request into a job of tasks and runs them on the deployment's instances.

    ``run_job`` places each task (``pool.wait_ready(role)`` gives the candidates, asking the
    scaler for an instance when there is none), submits it, forwards every event to ``emit``,
    and retries or fails the tasks whose instance died. It is cancelled when the client goes
    away; leaving a task stream aborts that task. Optional: ``admission``
    (``AdmissionControl``)."""

    def make_job(self, request: Request) -> Job: ...

    async def run_job(self, job: Job, pool: InstancePool, emit: EmitEvent) -> None: ...


@runtime_checkable
class AdmissionControl(Protocol):
    """Optional for a job scheduler: ``Deployment.admit`` asks the scheduler it built by name
    before queueing a request, so one that estimates its own latency (the SLO check of
    ``colocated`` and the PD schedulers) refuses early what would miss the deployment's SLOs."""

    def admission(self, request: Request, pool: InstancePool) -> Rejection | None:
        """A ``Rejection`` (its status and message reach the client) or None to admit."""



@runtime_checkable
class Scaler(Protocol):
    """Starts and stops a deployment's instances while ``run`` runs.

    ``run`` lives as long as the deployment; when cancelled it must stop every instance it
    started, and it starts none once ``deployment.stopping`` is set. ``set_target`` is the
    manual override (the admin API), and ``target`` reads it back (None until set: the spec's
    counts; the admin API and health reports show it); ``on_demand(role)`` says that a request
    is waiting for an instance of that role (scale from zero). Optional: ``observe``
    (``ObservesRequests``)."""

    @property
    def target(self) -> int | None:
        """The instance count ``set_target`` asked for; None: the spec's counts (the API shows it)."""

    async def run(self, deployment: Deployment) -> None: ...

    def set_target(self, instances: int) -> None: ...

    def on_demand(self, role: TaskRole) -> None: ...


@runtime_checkable
class ObservesRequests(Protocol):
    """Optional for a scaler: the deployment hands it every finished request's output (its
    TTFT feeds an SLO-driven autoscaler). Plugins that merely watch requests implement the
    ``flowserve_request_finished`` hook instead."""

    def observe(self, output: RequestOutput) -> None:
        """Called once per request, when it ends, on the event loop: keep it cheap."""


@runtime_checkable
class KVTransport(Protocol):
    """Moves exported KV bytes from a prefill instance to a decode instance.

    The decode side calls ``fetch`` and ``release`` from worker threads, several at once (they
    may wait while the engine's event loop goes on stepping), so both must be thread-safe.
    ``publish`` runs on the prefill instance's event loop, inside its step, so it should return
    quickly (``shm`` writes a file; ``ray`` puts the bytes in the object store)."""

    def publish(self, data: bytes | memoryview, key: str) -> str:
        """Make ``data`` fetchable; return the locator to put in a ``KVHandoff``."""

    def fetch(self, handoff: KVHandoff) -> memoryview:
        """The bytes ``handoff.locator`` names (may block until they are there)."""

    def release(self, locator: str) -> None:
        """The decode side is done with ``locator``'s bytes: free them."""


@runtime_checkable
class Frontend(Protocol):
    """The API a server speaks; ``serve`` runs until cancelled or the server shuts down."""

    async def serve(self, server: Server) -> None: ...


@runtime_checkable
class PluginLookup(Protocol):
    """What a component may look up in the plugin manager that built it (``PluginManager`` is
    one). Registration hooks and ``flowserve_check_deployment`` may take it as ``plugins``, so a
    factory that needs another plugin's component later is handed its manager, never the
    process-global one (a test that composes its own manager is then never bypassed)."""

    @property
    def hook(self) -> Any:
        """pluggy's hook relay: ``plugins.hook.flowserve_register_model_architectures(...)``."""

    def build(self, kind: str, name: str, *args: Any) -> Any:
        """Build the component ``name`` of ``kind`` (``ComponentNotFoundError`` names what to install)."""
