"""Conformance suite for batch schedulers: ``check_batch_scheduler(factory_or_name)``.

The suite plays the engine and an executor around the scheduler, through the Protocol only:
the executor's next token is the last one plus one, and a simulated KV memory stores each
computed token in the block and slot the batch's block table names, so a wrong block table,
a prefix hit on the wrong blocks or a recompute from the wrong position reads a wrong token.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

from flowserve_core.plugins import PluginManager
from flowserve_core.types import (
    DeploymentSpec,
    KVCacheSpec,
    KVUsage,
    Request,
    SamplingParams,
    StepBatch,
    StepResult,
    Task,
    TokenEvent,
)
from flowserve_testing._suite import require, resolve

VOCAB = 1000
_MAX_EMPTY_BATCHES = 3


def check_batch_scheduler(scheduler: str | Callable[..., Any], *, kv_cache: str | Callable[..., Any] = "paged",
                          pm: PluginManager | None = None, seed: int = 0) -> None:
    """Check that a batch scheduler keeps the ``BatchScheduler`` Protocol's promises.

    :param scheduler: its factory ``(spec, kv_cache, kv_transports) -> BatchScheduler`` (e.g. the class), or
        the name it is registered under.
    :param kv_cache: the KV cache manager to run it on: a factory ``(spec, KVCacheSpec)`` or a
        registered name (default ``paged``, from flowserve-paged-kv).
    Rules: it makes progress whenever it has work (preempting rather than deadlocking under
    memory pressure); batches respect ``max_num_seqs`` and ``max_num_batched_tokens`` and
    compute each sequence's own tokens through its KV manager's block table; finished or
    aborted tasks are never scheduled; every sampled token is reported; ``max_tokens`` ends
    a task with ``length``, EOS and ``stop_token_ids`` with ``stop`` (never before
    ``min_tokens``), the context length with ``length``; ``abort`` returns the task's last
    event; ``stats`` counts the live tasks; when all tasks end every KV block is free.
    Raises ``ConformanceError`` naming the broken rule.
    """
    make = resolve(scheduler, "batch_scheduler", pm)
    make_kv = resolve(kv_cache, "kv_cache", pm)
    rng = random.Random(seed)
    _mixed_load(make, make_kv, rng)
    _memory_pressure(make, make_kv, rng)
    _stops_and_lengths(make, make_kv)
    _aborts(make, make_kv)
    _refuses_what_can_never_fit(make, make_kv)


class _Drive:
    """The engine and an executor around one scheduler, checking every step."""

    def __init__(self, make: Callable[..., Any], make_kv: Callable[..., Any], *, max_num_seqs: int = 4,
                 max_num_batched_tokens: int = 32, num_blocks: int = 64, block_size: int = 4,
                 max_model_len: int = 256):
        self.spec = DeploymentSpec(name="conformance", model="conformance", block_size=block_size,
                                   max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                   max_model_len=max_model_len)
        self.kv = make_kv(self.spec, KVCacheSpec(num_blocks=num_blocks, block_size=block_size,
                                                 max_model_len=max_model_len))
        self.scheduler = make(self.spec, self.kv, PluginManager(load_entrypoints=False).kv_transports(self.spec))
        self.block_size = block_size
        self.live: dict[str, list[int]] = {}  # task id → prompt + outputs so far
        self.tasks: dict[str, Task] = {}
        self.outputs: dict[str, list[int]] = {}
        self.finished: dict[str, str] = {}  # task id → finish reason
        self.scheduled: list[str] = []  # task ids in the order they were first scheduled
        self.memory: dict[int, dict[int, int]] = {}  # block → slot → token id

    def add(self, prompt: list[int], eos_token_ids: tuple[int, ...] = (), **params: Any) -> str:
        task = Task(request=Request(prompt_token_ids=list(prompt), params=SamplingParams(**params),
                                    eos_token_ids=list(eos_token_ids)))
        self.scheduler.add(task)
        self.live[task.id], self.tasks[task.id], self.outputs[task.id] = list(prompt), task, []
        return task.id

    def abort(self, task_id: str) -> None:
        event = self.scheduler.abort(task_id)
        if task_id in self.live:
            require(isinstance(event, TokenEvent) and event.task_id == task_id and event.finish_reason == "abort",
                    "abort(task_id) of a live task (running or waiting) returns its last event, with "
                    "finish_reason 'abort'", f"got {event!r}")
            self._end(task_id, "abort")
        else:
            require(event is None, "abort of an unknown or ended task returns None", f"got {event!r}")

    def run(self, max_steps: int = 5000) -> None:
        empty = 0
        for _ in range(max_steps):
            require(self.scheduler.has_work() == bool(self.live),
                    "has_work() is true exactly while some task is running or waiting",
                    f"has_work() is {self.scheduler.has_work()} with {len(self.live)} live tasks")
            if not self.live:
                return
            empty = 0 if self.step().seqs else empty + 1
            require(empty <= _MAX_EMPTY_BATCHES, "schedule() makes progress whenever has_work()",
                    f"{empty} empty batches in a row with {len(self.live)} live tasks")
        require(False, "every task ends", f"{len(self.live)} tasks still live after {max_steps} steps")

    def step(self) -> StepBatch:
        batch = self.scheduler.schedule()
        self._check_batch(batch)
        result = self._execute(batch)
        self._record(batch, result, self.scheduler.update(batch, result))
        stats = self.scheduler.stats()
        require(stats.num_running <= self.spec.max_num_seqs, "stats().num_running <= max_num_seqs",
                f"{stats.num_running} > {self.spec.max_num_seqs}")
        require(stats.num_running + stats.num_waiting == len(self.live),
                "stats() counts every live task as running or waiting",
                f"{stats.num_running} running + {stats.num_waiting} waiting, {len(self.live)} live")
        require(isinstance(self.scheduler.kv_usage(), KVUsage), "kv_usage() returns a KVUsage")
        return batch

    def _check_batch(self, batch: StepBatch) -> None:
        spec, size = self.spec, self.block_size
        require(len(batch.seqs) <= spec.max_num_seqs, "a batch holds at most max_num_seqs sequences",
                f"{len(batch.seqs)} > {spec.max_num_seqs}")
        require(batch.num_tokens <= spec.max_num_batched_tokens,
                "a batch computes at most max_num_batched_tokens tokens",
                f"{batch.num_tokens} > {spec.max_num_batched_tokens}")
        ids = [s.seq_id for s in batch.seqs]
        require(len(set(ids)) == len(ids), "a sequence appears at most once in a batch", str(ids))
        for source, destination in batch.block_copies:
            self.memory[destination] = dict(self.memory.get(source, {}))
        written: dict[int, str] = {}
        for seq in batch.seqs:
            require(seq.seq_id in self.live, "only live tasks are scheduled, never a finished, aborted "
                    "or unknown one", f"{seq.seq_id} ({self.finished.get(seq.seq_id, 'unknown')})")
            if seq.seq_id not in self.scheduled:
                self.scheduled.append(seq.seq_id)
            history = self.live[seq.seq_id]
            start, end = seq.start_pos, seq.start_pos + len(seq.token_ids)
            require(seq.token_ids and start >= 0 and seq.token_ids == history[start:end],
                    "a scheduled sequence computes its own next tokens: token_ids == (prompt + "
                    "outputs)[start_pos:start_pos + len(token_ids)]",
                    f"{seq.seq_id} at {start}: {seq.token_ids[:8]} vs {history[start:start + 8]}")
            require(list(seq.prompt_token_ids) + list(seq.output_token_ids) == history,
                    "prompt_token_ids + output_token_ids are the task's tokens so far", seq.seq_id)
            require(seq.sample == (end == len(history)), "sample is set exactly when the computed "
                    "tokens reach the sequence's end", f"{seq.seq_id}: sample={seq.sample}, {end}/{len(history)}")
            table = list(seq.block_table)
            require(table == list(self.kv.block_table(seq.seq_id)),
                    "the block table sent is the KV cache manager's block table of that sequence", seq.seq_id)
            if not table:  # a KV manager without blocks (nothing to read or write)
                continue
            require(len(table) * size >= end, "the block table covers every computed position",
                    f"{seq.seq_id}: {len(table)} blocks of {size} for {end} tokens")
            for position in range(start):
                held = self.memory.get(table[position // size], {}).get(position % size)
                require(held == history[position], "earlier positions are read from blocks that hold "
                        "them (prefix hits, preemption and copy-on-write keep the KV right)",
                        f"{seq.seq_id} position {position} reads {held}, not {history[position]}")
            for position in range(start, end):
                block = table[position // size]
                require(written.setdefault(block, seq.seq_id) == seq.seq_id,
                        "no block is written by two sequences in one step", f"block {block}")
                self.memory.setdefault(block, {})[position % size] = history[position]

    def _execute(self, batch: StepBatch) -> StepResult:
        tokens = {}
        for seq in batch.seqs:
            if seq.sample:
                token = (self.live[seq.seq_id][-1] + 1) % VOCAB
                if token in seq.eos_token_ids and len(seq.output_token_ids) < seq.params.min_tokens:
                    token = (token + 1) % VOCAB  # the executor's part of min_tokens: mask EOS
                tokens[seq.seq_id] = token
        return StepResult(token_ids=tokens)

    def _record(self, batch: StepBatch, result: StepResult, events: list[TokenEvent]) -> None:
        in_batch = {s.seq_id for s in batch.seqs}
        reported: set[str] = set()
        for event in events:
            require(event.task_id in in_batch and event.task_id not in reported,
                    "update() returns at most one event per sequence of the batch", event.task_id)
            reported.add(event.task_id)
            expected = [result.token_ids[event.task_id]] if event.task_id in result.token_ids else []
            require(list(event.token_ids) == expected, "an event carries the token the executor "
                    "sampled for that sequence, and no other", f"{event.token_ids} vs {expected}")
            self.live[event.task_id] += expected
            self.outputs[event.task_id] += expected
            if event.finish_reason:
                self._end(event.task_id, event.finish_reason)
        missing = set(result.token_ids) - reported
        require(not missing, "every sequence that sampled a token gets an event carrying it", str(missing))

    def _end(self, task_id: str, reason: str) -> None:
        del self.live[task_id]
        self.finished[task_id] = reason

    def check_all_free(self) -> None:
        usage = self.kv.usage()
        require(usage.used_blocks == 0, "when every task has ended, every KV block is free",
                f"{usage.used_blocks} of {usage.total_blocks} blocks still used")

    def check_length(self, task_id: str, max_tokens: int) -> None:
        require(self.finished.get(task_id) == "length" and len(self.outputs[task_id]) == max_tokens,
                "a task ends with finish_reason 'length' after exactly max_tokens tokens",
                f"{self.finished.get(task_id)!r} after {len(self.outputs[task_id])} of {max_tokens}")


def _prompt(rng: random.Random, length: int, prefix: Sequence[int] = ()) -> list[int]:
    return (list(prefix) + [rng.randrange(1, VOCAB) for _ in range(length)])[:max(length, 1)]


def _mixed_load(make: Callable[..., Any], make_kv: Callable[..., Any], rng: random.Random) -> None:
    """Prompts short and long (longer than the token budget), some with a shared prefix."""
    drive = _Drive(make, make_kv)
    shared = _prompt(rng, 12)
    wanted: dict[str, int] = {}
    for length, max_tokens, prefix in [(3, 5, ()), (17, 2, shared), (45, 4, ()), (9, 8, ()), (25, 3, shared),
                                       (6, 10, ()), (33, 1, shared), (12, 6, shared), (1, 4, ())]:
        prompt = _prompt(rng, length, prefix)
        try:
            task_id = drive.add(prompt, max_tokens=max_tokens, temperature=0.0)
        except ValueError as exc:
            require(length > drive.spec.max_num_batched_tokens, "add() refuses only tasks that can never "
                    "run (ValueError)", f"a {length}-token prompt was refused: {exc}")
            continue
        wanted[task_id] = max_tokens
    drive.run()
    for task_id, max_tokens in wanted.items():
        drive.check_length(task_id, max_tokens)
    drive.check_all_free()


def _memory_pressure(make: Callable[..., Any], make_kv: Callable[..., Any], rng: random.Random) -> None:
    """More KV wanted at once than exists: the scheduler must preempt or wait, never stall."""
    drive = _Drive(make, make_kv, max_num_seqs=6, max_num_batched_tokens=64, num_blocks=12)
    tasks = [drive.add(_prompt(rng, 10), max_tokens=12) for _ in range(6)]
    drive.run()
    for task_id in tasks:
        drive.check_length(task_id, 12)
    drive.check_all_free()


def _stops_and_lengths(make: Callable[..., Any], make_kv: Callable[..., Any]) -> None:
    drive = _Drive(make, make_kv, max_num_seqs=8, max_model_len=64)
    eos = drive.add([100, 200], eos_token_ids=(203,), max_tokens=10)
    ignored = drive.add([300, 400], eos_token_ids=(403,), max_tokens=5, ignore_eos=True)
    stop_id = drive.add([500, 600], max_tokens=10, stop_token_ids=[602])
    early = drive.add([700, 800], eos_token_ids=(801,), max_tokens=6, min_tokens=3)
    context = drive.add(list(range(1, 61)), max_tokens=None)
    drive.run()
    require(drive.finished[eos] == "stop" and drive.outputs[eos] == [201, 202, 203],
            "an EOS token ends the task with finish_reason 'stop'", f"{drive.finished[eos]!r}, {drive.outputs[eos]}")
    drive.check_length(ignored, 5)
    require(drive.finished[stop_id] == "stop" and drive.outputs[stop_id] == [601, 602],
            "a stop_token_ids token ends the task with 'stop'", f"{drive.finished[stop_id]!r}, {drive.outputs[stop_id]}")
    require(drive.finished[early] != "stop" or len(drive.outputs[early]) >= 3,
            "no task stops before min_tokens tokens", str(drive.outputs[early]))
    total = 60 + len(drive.outputs[context])
    require(drive.finished[context] == "length" and total <= 64 and drive.outputs[context],
            "a task without max_tokens ends with 'length' at the context length (max_model_len)",
            f"{drive.finished[context]!r} with {total} tokens, context 64")
    drive.check_all_free()


def _aborts(make: Callable[..., Any], make_kv: Callable[..., Any]) -> None:
    drive = _Drive(make, make_kv, max_num_seqs=2)
    tasks = [drive.add([10 * i + 1] * 6, max_tokens=20) for i in range(1, 5)]
    drive.step()
    drive.step()
    running = drive.scheduled[0]
    waiting = next(t for t in reversed(tasks) if t not in drive.scheduled)
    drive.abort(running)
    drive.abort(waiting)
    drive.abort(running)  # again: now unknown
    drive.abort("task-that-never-was")
    drive.run()
    for task_id in set(tasks) - {running, waiting}:
        drive.check_length(task_id, 20)
    drive.check_all_free()


def _refuses_what_can_never_fit(make: Callable[..., Any], make_kv: Callable[..., Any]) -> None:
    drive = _Drive(make, make_kv, num_blocks=8, max_model_len=1024, max_num_batched_tokens=64)
    capacity = drive.kv.usage().total_blocks * drive.block_size
    if capacity > 100_000:  # a KV manager without limits: nothing is too long for it
        return
    prompt = list(range(1, capacity + 9))
    try:
        drive.add(prompt, max_tokens=4)
    except ValueError:
        pass
    else:
        require(False, "add() raises ValueError for a task that can never fit the whole KV cache",
                f"a {len(prompt)}-token prompt was accepted by a cache of {capacity} tokens")
    task_id = drive.add([5, 6, 7], max_tokens=3)
    drive.run()
    drive.check_length(task_id, 3)
    drive.check_all_free()
