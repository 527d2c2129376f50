"""Toy components for FlowServe's kernel tests; real plugins, no model.

- tokenizer ``whitespace``: word ``tN`` is token ``N``; any other word hashes to a token.
  Its detokenizer honours stop strings (and ``include_stop_str_in_output``), holding back
  text that a stop string may still swallow.
- executor ``counter``: the next token is the last one plus one (mod the vocabulary).
  Options: ``step_delay`` (seconds per step, in a thread), ``fail_on_token`` (a step that
  would emit this token raises), ``die_after_steps`` (the executor dies: EngineDeadError),
  ``fail_to_start`` (building the executor raises), ``record_params`` (a file: one JSON line
  per new sequence with its prompt and SamplingParams). When a sequence asks for logprobs,
  the counter's "distribution" gives token last+1+j the logprob -(j+1)·ln 2. A decode asked
  for ``decode_steps`` tokens gets them, ending early at a stop token.
  ``num_blocks`` sets the KV blocks (of 16 tokens) it reports, default 1<<20 (a small cache
  makes KV cache managers preempt).
- kv cache ``unbounded``: bookkeeping without limits.
- batch scheduler ``fifo``: every admitted task decodes one token per step; it honours
  ``stop_token_ids``, ``min_tokens`` and the context length (``max_model_len``, default 256).
- job scheduler ``least-tasks``: one colocated task on the ready instance with fewest tasks.
"""

from __future__ import annotations

import math
import time
import zlib
from typing import Any, Sequence

import anyio
import msgspec

from flowserve_core import hookimpl
from flowserve_core.deployment import InstancePool
from flowserve_core.errors import EngineDeadError
from flowserve_core.factories import (
    BatchSchedulerFactory,
    ExecutorFactory,
    JobSchedulerFactory,
    KVCacheManagerFactory,
    KVTransports,
    Register,
    TokenizerFactory,
)
from flowserve_core.interfaces import EmitEvent, KVCacheManager, TextDelta
from flowserve_core.types import (
    DeploymentSpec,
    FinishReason,
    Job,
    KVCacheSpec,
    KVUsage,
    Request,
    ScheduledSequence,
    SchedulerStats,
    StepBatch,
    StepResult,
    Task,
    TaskRole,
    TokenEvent,
    TokenLogprob,
    TopLogprob,
)

VOCAB = 1000


def toy_spec(**overrides: Any) -> DeploymentSpec:
    """A deployment of these toy components (in-process instances unless overridden)."""
    fields: dict[str, Any] = dict(
        name="toy", model="toy", tokenizer="whitespace", executor="counter", kv_cache="unbounded",
        batch_scheduler="fifo", job_scheduler="least-tasks", scaler="inproc")
    fields.update(overrides)
    return DeploymentSpec(**fields)


class WhitespaceTokenizer:
    """Words ↔ token ids; token 0 is the end of sequence."""

    eos_token_ids = [0]
    vocab_size = VOCAB
    max_model_len = 256

    def __init__(self, spec: DeploymentSpec):
        self.spec = spec

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [int(w[1:]) % VOCAB if w[:1] == "t" and w[1:].isdigit()
                else zlib.crc32(w.encode()) % (VOCAB - 1) + 1 for w in text.split()]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" t{i}" for i in token_ids)

    def apply_chat_template(self, messages: Sequence[Any]) -> list[int]:
        return self.encode(" ".join(f"{m.role} {m.content}" for m in messages))

    def token_text(self, token_id: int) -> str:
        return f" t{token_id}"

    def detokenizer(self, prompt_token_ids: Sequence[int], params: Any) -> Any:
        return _Detokenizer(self, params)


class _Detokenizer:
    """Decodes pushed tokens; stops at the first stop string, never emitting text that a
    stop string may still swallow (a suffix that begins some stop string is held back)."""

    def __init__(self, tokenizer: WhitespaceTokenizer, params: Any = None):
        self.tokenizer = tokenizer
        self.stop = list(getattr(params, "stop", None) or [])
        self.include_stop = bool(getattr(params, "include_stop_str_in_output", False))
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def _take(self, end: int) -> str:
        out = self.text[self.emitted:max(end, self.emitted)]
        self.emitted = max(end, self.emitted)
        return out

    def push(self, token_ids: Sequence[int]) -> TextDelta:
        if self.stopped:
            return TextDelta(stopped=True)
        self.text += self.tokenizer.decode(token_ids)
        hits = [(at, stop) for stop in self.stop if (at := self.text.find(stop, self.emitted)) != -1]
        if hits:
            at, stop = min(hits)
            self.stopped = True
            return TextDelta(text=self._take(at + len(stop) if self.include_stop else at), stopped=True)
        hold = max((k for stop in self.stop for k in range(1, len(stop))
                    if self.text.endswith(stop[:k])), default=0)
        return TextDelta(text=self._take(len(self.text) - hold))

    def finish(self) -> str:
        return "" if self.stopped else self._take(len(self.text))


def toy_embedding(prompt: Sequence[int], dimensions: int | None) -> list[float]:
    """The counter executor's embedding: 8 values (or ``dimensions``) from the prompt's tokens,
    L2-normalized: ``e[i]`` ∝ 1 + how many prompt tokens are ``i`` modulo its length."""
    size = dimensions or 8
    counts = [1.0] * size
    for token in prompt:
        counts[token % size] += 1
    norm = math.sqrt(sum(c * c for c in counts))
    return [c / norm for c in counts]


class CounterExecutor:
    """Next token = last token + 1 (an embedding: ``toy_embedding``); optional delay and
    injected failures."""

    def __init__(self, spec: DeploymentSpec):
        self.options = spec.options
        self.steps = 0
        self._recorded: set[str] = set()
        if self.options.get("fail_to_start"):
            raise RuntimeError("injected start failure of the counter executor (fail_to_start)")

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(num_blocks=int(self.options.get("num_blocks", 1 << 20)), block_size=16,
                           max_model_len=256)

    def _compute(self, batch: StepBatch) -> StepResult:
        delay = float(self.options.get("step_delay", 0))
        if delay:
            time.sleep(delay)
        self._record(batch)
        result = StepResult()
        for seq in batch.seqs:
            if seq.sample and seq.pooling is not None:
                result.embeddings[seq.seq_id] = toy_embedding(seq.prompt_token_ids, seq.pooling.dimensions)
            elif seq.sample:
                self._count(seq, result)
        return result

    def _count(self, seq: ScheduledSequence, result: StepResult) -> None:
        """Sample ``seq``: its next token, and with ``decode_steps`` the ones after it, up to a
        stop token once ``min_tokens`` are out (as an executor decoding several steps may)."""
        last, outputs = seq.token_ids[-1], len(seq.output_token_ids)
        for step in range(seq.decode_steps):
            token = (last + 1) % VOCAB
            if token == self.options.get("fail_on_token"):
                raise RuntimeError(f"injected failure on token {token}")
            logprob = None if seq.params.logprobs is None else TokenLogprob(
                token_id=token, logprob=-math.log(2),
                top=[TopLogprob(token_id=(last + 1 + j) % VOCAB, logprob=-(j + 1) * math.log(2))
                     for j in range(seq.params.logprobs)])
            if step == 0:
                result.token_ids[seq.seq_id] = token
                if logprob is not None:
                    result.logprobs[seq.seq_id] = logprob
            else:
                result.more_token_ids.setdefault(seq.seq_id, []).append(token)
                if logprob is not None:
                    result.more_logprobs.setdefault(seq.seq_id, []).append(logprob)
            last, outputs = token, outputs + 1
            if token in seq.eos_token_ids and outputs >= seq.params.min_tokens:
                return

    def _record(self, batch: StepBatch) -> None:
        """With option ``record_params``, append each new sequence's prompt and params (JSON)."""
        path = self.options.get("record_params")
        new = [s for s in batch.seqs if s.seq_id not in self._recorded] if path else []
        if new:
            with open(str(path), "ab") as out:
                for seq in new:
                    self._recorded.add(seq.seq_id)
                    out.write(msgspec.json.encode({"seq_id": seq.seq_id, "params": seq.params,
                                                   "prompt_token_ids": seq.prompt_token_ids}) + b"\n")

    async def execute(self, batch: StepBatch) -> StepResult:
        self.steps += 1
        if self.steps > int(self.options.get("die_after_steps", 1 << 62)):
            raise EngineDeadError("injected death of the counter executor")
        return await anyio.to_thread.run_sync(self._compute, batch)


class UnboundedKVCache:
    """Block bookkeeping with no limit (the counter executor keeps no KV)."""

    block_size = 16

    def __init__(self, spec: DeploymentSpec, kv: KVCacheSpec):
        self.tables: dict[str, int] = {}

    def allocate(self, seq_id: str, token_ids: Sequence[int]) -> int | None:
        self.tables[seq_id] = len(token_ids)
        return 0

    def append_slots(self, seq_id: str, num_tokens: int) -> bool:
        self.tables[seq_id] = num_tokens
        return True

    def commit(self, seq_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        pass

    def free(self, seq_id: str) -> None:
        self.tables.pop(seq_id, None)

    def fork(self, parent_seq_id: str, child_seq_id: str) -> None:
        self.tables[child_seq_id] = self.tables[parent_seq_id]

    def block_table(self, seq_id: str) -> list[int]:
        return []

    def num_cached_tokens(self, token_ids: Sequence[int]) -> int:
        return 0

    def usage(self) -> KVUsage:
        used = sum(-(-n // 16) for n in self.tables.values())
        return KVUsage(total_blocks=1 << 20, used_blocks=used, free_blocks=(1 << 20) - used)


class FifoScheduler:
    """All admitted tasks decode together, one token per step, up to ``max_num_seqs``."""

    def __init__(self, spec: DeploymentSpec, kv_cache: KVCacheManager, kv_transports: KVTransports):
        self.spec, self.kv = spec, kv_cache  # hands off no KV: kv_transports is not needed
        self.max_model_len = spec.max_model_len or 256
        self.running: dict[str, Task] = {}
        self.waiting: list[Task] = []

    def add(self, task: Task) -> None:
        if not task.request.prompt_token_ids:
            raise ValueError("the prompt is empty")
        self.waiting.append(task)

    def abort(self, task_id: str) -> TokenEvent | None:
        waiting = len(self.waiting)
        self.waiting = [t for t in self.waiting if t.id != task_id]
        if self.running.pop(task_id, None) is None and len(self.waiting) == waiting:
            return None
        self.kv.free(task_id)
        return TokenEvent(task_id=task_id, finish_reason="abort")

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> StepBatch:
        while self.waiting and len(self.running) < self.spec.max_num_seqs:
            task = self.waiting.pop(0)
            self.kv.allocate(task.id, task.request.prompt_token_ids)
            self.running[task.id] = task
        seqs = []
        for task in self.running.values():
            history = task.request.prompt_token_ids + task.output_token_ids
            seqs.append(ScheduledSequence(
                seq_id=task.id, token_ids=history[-1:], start_pos=len(history) - 1, block_table=[],
                params=task.request.params, prompt_token_ids=task.request.prompt_token_ids,
                output_token_ids=task.output_token_ids, pooling=task.request.pooling))
        return StepBatch(seqs=seqs)

    def update(self, batch: StepBatch, result: StepResult) -> list[TokenEvent]:
        events = []
        for seq_id, embedding in result.embeddings.items():  # an embedding ends with its vector
            task = self.running.pop(seq_id, None)
            if task is not None:
                self.kv.free(seq_id)
                events.append(TokenEvent(task_id=seq_id, finish_reason="stop", embedding=embedding,
                                         num_prompt_tokens=len(task.request.prompt_token_ids)))
        for seq_id, token in result.token_ids.items():
            task = self.running.get(seq_id)
            if task is None:
                continue
            task.output_token_ids.append(token)
            params = task.request.params
            reason: FinishReason | None = None
            stops = (token in task.request.eos_token_ids and not params.ignore_eos) or \
                token in params.stop_token_ids
            if stops and len(task.output_token_ids) >= params.min_tokens:
                reason = "stop"
            elif params.max_tokens and len(task.output_token_ids) >= params.max_tokens:
                reason = "length"
            elif len(task.request.prompt_token_ids) + len(task.output_token_ids) >= self.max_model_len:
                reason = "length"
            logprob = result.logprobs.get(seq_id)
            events.append(TokenEvent(task_id=seq_id, token_ids=[token], finish_reason=reason,
                                     logprobs=[logprob] if logprob is not None else None,
                                     num_prompt_tokens=len(task.request.prompt_token_ids)))
            if reason:
                del self.running[seq_id]
                self.kv.free(seq_id)
        return events

    def stats(self) -> SchedulerStats:
        return SchedulerStats(num_running=len(self.running), num_waiting=len(self.waiting))

    def kv_usage(self) -> KVUsage:
        return self.kv.usage()


class LeastTasksJobScheduler:
    """One colocated task per request, on the ready instance with the fewest tasks."""

    def __init__(self, spec: DeploymentSpec, kv_transports: KVTransports):
        self.spec = spec

    def make_job(self, request: Request) -> Job:
        job = Job(request=request)
        job.tasks.append(Task(job_id=job.id, role=TaskRole.COLOCATED, request=request))
        return job

    async def run_job(self, job: Job, pool: InstancePool, emit: EmitEvent) -> None:
        task = job.tasks[0]
        instances = await pool.wait_ready(TaskRole.COLOCATED, timeout=60)
        instance = min(instances, key=lambda i: i.num_tasks)
        async with instance.submit(task) as events:
            async for event in events:
                await emit(event)


@hookimpl
def flowserve_register_tokenizers(register: Register[TokenizerFactory]) -> None:
    register("whitespace", WhitespaceTokenizer)


@hookimpl
def flowserve_register_executors(register: Register[ExecutorFactory]) -> None:
    register("counter", CounterExecutor)


@hookimpl
def flowserve_register_kv_cache_managers(register: Register[KVCacheManagerFactory]) -> None:
    register("unbounded", UnboundedKVCache)


@hookimpl
def flowserve_register_batch_schedulers(register: Register[BatchSchedulerFactory]) -> None:
    register("fifo", FifoScheduler)


@hookimpl
def flowserve_register_job_schedulers(register: Register[JobSchedulerFactory]) -> None:
    register("least-tasks", LeastTasksJobScheduler)
