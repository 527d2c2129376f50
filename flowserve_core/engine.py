"""The event loop of one engine instance, on anyio: admit → schedule → execute → update → emit.

Tasks and aborts arrive between steps (a batch in flight never sees its blocks freed under it);
the executor computes off the loop; each step's events go out in one call of ``emit``."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Awaitable, Callable

import anyio

from flowserve_core.errors import EngineDeadError
from flowserve_core.interfaces import BatchScheduler, EndsStepsEarly, Executor
from flowserve_core.plugins import PluginManager
from flowserve_core.types import DeploymentSpec, InstanceStats, StepBatch, Task, TokenEvent

log = logging.getLogger(__name__)

EmitEvents = Callable[[list[TokenEvent]], Awaitable[None]]


class Engine:
    """One instance's scheduler and executor, driven step by step; ``emit`` gets each step's events.

    If the executor dies (``EngineDeadError``) or a step outlives ``step_timeout``, every live
    task fails with an error event and ``dead`` tells why; other exceptions fail that step's tasks."""

    def __init__(self, executor: Executor, scheduler: BatchScheduler, emit: EmitEvents, *,
                 step_timeout: float | None = None):
        self.executor = executor
        self.scheduler = scheduler
        self.emit = emit
        self.step_timeout = step_timeout or math.inf
        self.stats = InstanceStats()
        self.dead: str | None = None
        self._inbox: list[Task | str] = []
        self._live: set[str] = set()
        self._wakeup = anyio.Event()
        self._ends_early = executor if isinstance(executor, EndsStepsEarly) else None

    def submit(self, task: Task) -> None:
        """Queue a task; it joins the scheduler before the next step."""
        if self.dead:
            raise EngineDeadError(f"engine is dead: {self.dead}")
        self._inbox.append(task)
        self._wake()

    def abort(self, task_id: str) -> None:
        """Stop a task before the next step; its last event says ``abort``."""
        self._inbox.append(task_id)
        self._wake()

    def _wake(self) -> None:
        """New work for the loop: a step decoding several tokens returns after its round."""
        self._wakeup.set()
        if self._ends_early is not None:
            self._ends_early.end_step_early()

    async def run(self) -> None:
        """Step until cancelled, or until the executor dies."""
        while not self.dead:
            events = self._apply_inbox()
            if not self.scheduler.has_work():
                await self._send(events)
                self._wakeup = anyio.Event()
                if not self._inbox:
                    await self._wakeup.wait()
                continue
            batch = self.scheduler.schedule()
            if batch.seqs:
                events += await self._step(batch)
            elif not self._inbox:
                # Nothing fits this step (e.g. waiting for aborts to free blocks): yield.
                await anyio.sleep(0.001)
            await self._send(events)
        queued = {item.id for item in self._inbox if isinstance(item, Task)}
        self._inbox.clear()
        await self._send(self._fail(self._live | queued, f"engine is dead: {self.dead}", instance_failed=True))

    async def _step(self, batch: StepBatch) -> list[TokenEvent]:
        try:
            with anyio.fail_after(self.step_timeout):
                result = await self.executor.execute(batch)
        except (EngineDeadError, TimeoutError) as exc:
            self.dead = str(exc) or f"a step took longer than {self.step_timeout} s"
            log.error("engine died: %s", self.dead)
            return []
        except Exception as exc:  # a bad batch fails its own tasks, not the engine
            log.exception("step failed", extra={"num_seqs": len(batch.seqs)})
            return self._fail({s.seq_id for s in batch.seqs}, f"step failed: {exc!r}")
        events = self.scheduler.update(batch, result)
        self._count(batch, len(result.token_ids))
        return events

    def _apply_inbox(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        inbox, self._inbox = self._inbox, []
        for item in inbox:
            if isinstance(item, Task):
                try:
                    self.scheduler.add(item)
                except ValueError as exc:  # can never run here, e.g. longer than the KV cache
                    events.append(TokenEvent(task_id=item.id, finish_reason="error", error=str(exc)))
                else:
                    self._live.add(item.id)
            elif item in self._live:
                event = self.scheduler.abort(item)
                events.append(event or TokenEvent(task_id=item, finish_reason="abort"))
        return events

    def _fail(self, task_ids: set[str], error: str, instance_failed: bool = False) -> list[TokenEvent]:
        """Drop ``task_ids`` from the scheduler; their last events carry ``error``."""
        for task_id in task_ids:
            with contextlib.suppress(Exception):  # the scheduler may be as broken as the executor
                self.scheduler.abort(task_id)
        return [TokenEvent(task_id=t, finish_reason="error", error=error, instance_failed=instance_failed)
                for t in task_ids]

    async def _send(self, events: list[TokenEvent]) -> None:
        for event in events:
            if event.finish_reason:
                self._live.discard(event.task_id)
        self.stats.scheduler = self.scheduler.stats()
        self.stats.kv = self.scheduler.kv_usage()
        if events:
            await self.emit(events)

    def _count(self, batch: StepBatch, sampled: int) -> None:
        self.stats.steps += 1
        self.stats.generation_tokens += sampled
        for seq in batch.seqs:
            prompt_end = min(seq.start_pos + len(seq.token_ids), len(seq.prompt_token_ids))
            self.stats.prompt_tokens += max(0, prompt_end - seq.start_pos)


async def build_engine(spec: DeploymentSpec, pm: PluginManager, emit: EmitEvents) -> Engine:
    """Build an instance's executor (in a worker thread: loading weights blocks), KV cache
    manager and batch scheduler by name."""
    executor = await anyio.to_thread.run_sync(pm.build, "executor", spec.executor, spec)
    kv_cache = pm.build("kv_cache", spec.kv_cache, spec, executor.kv_cache_spec())
    scheduler = pm.build("batch_scheduler", spec.batch_scheduler, spec, kv_cache, pm.kv_transports(spec))
    return Engine(executor, scheduler, emit, step_timeout=spec.step_timeout_seconds)
