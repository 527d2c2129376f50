"""Job scheduler ``pd-disaggregated``: each request is a prefill task on a prefill instance,
then a decode task on a decode instance that imports the prefill's KV.

Placement: a prefill goes to the prefill instance with the least prefill work queued (tasks
in flight, then waiting prefill tokens), preferring the one that last prefilled the same
prompt prefix when it is not much busier (its prefix cache likely holds it); a decode goes to
the decode instance with the fewest running sequences and the most free KV blocks.

Options (``DeploymentSpec.options``):

- ``pd_on_failure`` (``reroute`` | ``fail``, default ``reroute``): when a decode instance dies
  mid-request, run the rest on another decode instance (it recomputes the KV from the tokens
  so far: greedy output is unchanged), or end the request with the error; when a prefill
  instance dies, run the prefill again on another one, or end the request with the error.
- ``retry_on_instance_death`` (default 2): attempts per phase on instances that died.
- ``instance_wait_timeout`` (seconds, default 600): how long a task waits for a ready instance.
- ``pd_locality_slack`` (tasks, default 2): how much busier the prefix-locality choice may be.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

from flowserve_colocated.router import ColocatedJobScheduler, _InstanceDied
from flowserve_core.interfaces import EmitEvent, Instance
from flowserve_core.types import (
    DeploymentSpec, Job, KVHandoff, Rejection, Request, Task, TaskRole, TaskState, TokenEvent,
)

from flowserve_colocated.estimate import Ewma, LinearFit

log = logging.getLogger(__name__)

#: Prompt tokens that name a prefix for locality (two blocks of the default size).
LOCALITY_TOKENS = 32


class DisaggregatedJobScheduler(ColocatedJobScheduler):
    """Prefill on a prefill instance, KV handed off, decode on a decode instance; SLO-aware
    admission from measured prefill speed and decode time per token."""

    def __init__(self, spec: DeploymentSpec):
        super().__init__(spec)
        options = spec.options
        self.on_failure = str(options.get("pd_on_failure", "reroute"))
        if self.on_failure not in ("reroute", "fail"):
            raise ValueError(f"option pd_on_failure must be 'reroute' or 'fail', got {self.on_failure!r}")
        self.locality_slack = int(options.get("pd_locality_slack", 2))
        #: Time to first token against prefill work (tokens queued ahead + new tokens).
        self.prefill_time = LinearFit()
        self._queued_at_placement: dict[str, int] = {}
        self.decode_seconds_per_token = Ewma()
        self._last_prefill_on: collections.OrderedDict[tuple[int, ...], str] = collections.OrderedDict()
        self._transports: dict[str, Any] = {}

    def make_job(self, request: Request) -> Job:
        """A job of two tasks: prefill, then decode (its first token and KV come from prefill)."""
        job = Job(request=request)
        job.tasks = [Task(job_id=job.id, role=TaskRole.PREFILL, request=request),
                     Task(job_id=job.id, role=TaskRole.DECODE, request=request)]
        return job

    async def run_job(self, job: Job, pool: Any, emit: EmitEvent) -> None:
        """Run the prefill, hand its KV to a decode instance, stream the decode."""
        job.move_to(TaskState.RUNNING)
        last = await self.run_disaggregated(job.tasks[0], job.tasks[1], pool, emit)
        state = {"error": TaskState.FAILED, "abort": TaskState.ABORTED}.get(
            last.finish_reason if last else "error", TaskState.DONE)
        job.move_to(state)

    async def run_disaggregated(self, prefill: Task, decode: Task, pool: Any, emit: EmitEvent) -> TokenEvent | None:
        """The two phases of one request; returns the request's last event."""
        request = prefill.request
        prefill.move_to(TaskState.RUNNING)
        started = time.monotonic()
        try:
            first = await self._phase(prefill, pool, emit, self._place_prefill, forward_last=False)
        finally:  # what was queued where the prefill was placed: the fit's x, with its own tokens
            queued = self._queued_at_placement.pop(request.id, 0)
        if first is None:
            return None
        if not self._continues(request, first):
            prefill.move_to(_state(first))
            decode.move_to(TaskState.ABORTED)
            await emit(first)
            return first
        prefill.move_to(TaskState.DONE)
        new_tokens = max(1, len(request.prompt_token_ids) - first.num_cached_tokens)
        self.prefill_time.add(queued + new_tokens, time.monotonic() - started)
        await emit(TokenEvent(task_id=first.task_id, token_ids=first.token_ids, logprobs=first.logprobs,
                              num_prompt_tokens=first.num_prompt_tokens,
                              num_cached_tokens=first.num_cached_tokens))
        decode.output_token_ids = list(first.token_ids)
        decode.kv_handoff = first.kv_handoff
        decode.move_to(TaskState.RUNNING)
        try:
            return await self._decode(decode, pool, emit)
        finally:
            if first.kv_handoff is not None:  # idempotent: the decode side normally released it
                self._release(first.kv_handoff)

    async def _decode(self, decode: Task, pool: Any, emit: EmitEvent) -> TokenEvent | None:
        """The decode phase, rerouted (recomputing from the tokens so far) if its instance dies."""
        produced: list[int] = []

        async def forward(event: TokenEvent) -> None:
            if event.instance_failed:
                return  # decided below: rerouted, or emitted as the request's end
            produced.extend(event.token_ids)
            await emit(event)

        failed_on: set[str] = set()
        attempts = 0
        while True:
            attempts += 1
            started, before = time.monotonic(), len(produced)
            instance = await self._place_decode(pool, failed_on)
            try:
                last = await self._run_on(instance, decode, forward)
            except _InstanceDied as died:
                last = TokenEvent(task_id=decode.id, finish_reason="error", error=died.error, instance_failed=True)
            if last is not None and last.instance_failed and self.on_failure == "reroute" \
                    and attempts <= self.max_retries:
                failed_on.add(instance.info.id)
                log.warning("decode instance %s died; rerouting task %s after %d tokens", instance.info.id,
                            decode.id, len(decode.output_token_ids) + len(produced),
                            extra={"task_id": decode.id, "instance": instance.info.id})
                # The retry recomputes the KV from every token the client already has.
                decode = Task(job_id=decode.job_id, role=TaskRole.DECODE, request=decode.request,
                              output_token_ids=decode.output_token_ids + produced)
                produced.clear()
                decode.move_to(TaskState.RUNNING)
                continue
            if last is not None and last.instance_failed:
                await emit(last)
            if len(produced) > before + 1:
                self.decode_seconds_per_token.add((time.monotonic() - started) / (len(produced) - before))
            decode.move_to(_state(last))
            return last

    async def _phase(self, task: Task, pool: Any, emit: EmitEvent, place: Any, *, forward_last: bool) -> TokenEvent | None:
        """Run ``task`` where ``place`` says, retrying on instances that die before its token."""
        failed_on: set[str] = set()
        attempts = 0
        while True:
            attempts += 1
            instance = await place(pool, failed_on, task.request)
            try:
                return await self._run_on(instance, task, emit if forward_last else _ignore)
            except _InstanceDied as died:
                failed_on.add(instance.info.id)
                if self.on_failure == "fail":
                    return TokenEvent(task_id=task.id, finish_reason="error", instance_failed=True,
                                      error=f"{task.role.value} instance {instance.info.id} died: {died.error}")
                if attempts > self.max_retries:
                    last = TokenEvent(task_id=task.id, finish_reason="error",
                                      error=f"{died.error} (gave up after {attempts} attempts)")
                    return last

    def _continues(self, request: Request, first: TokenEvent) -> bool:
        """Whether the request goes on after its prefill's first token."""
        if first.finish_reason != "length":
            return False
        if first.kv_handoff is not None:
            return True
        max_tokens = request.params.max_tokens
        return max_tokens is None or len(first.token_ids) < max_tokens

    # ------------------------------------------------------------------ placement

    async def _place_prefill(self, pool: Any, avoid: set[str], request: Request) -> Instance:
        ready = [i for i in await self._ready(pool, TaskRole.PREFILL) if i.info.id not in avoid] or \
            await self._ready(pool, TaskRole.PREFILL)
        lightest = min(ready, key=_prefill_load)
        key = tuple(request.prompt_token_ids[:LOCALITY_TOKENS])
        if len(key) == LOCALITY_TOKENS:
            local = next((i for i in ready if i.info.id == self._last_prefill_on.get(key)), None)
            if local is not None and _prefill_load(local)[0] <= _prefill_load(lightest)[0] + self.locality_slack:
                lightest = local
            self._last_prefill_on[key] = lightest.info.id
            self._last_prefill_on.move_to_end(key)
            while len(self._last_prefill_on) > 4096:
                self._last_prefill_on.popitem(last=False)
        self._queued_at_placement[request.id] = _prefill_load(lightest)[1]
        return lightest

    async def _place_decode(self, pool: Any, avoid: set[str], request: Request | None = None) -> Instance:
        ready = await self._ready(pool, TaskRole.DECODE)
        return min([i for i in ready if i.info.id not in avoid] or ready, key=_decode_load)

    async def _ready(self, pool: Any, role: TaskRole) -> list[Instance]:
        try:
            return await pool.wait_ready(role, timeout=self.wait_timeout)
        except TimeoutError:
            raise TimeoutError(f"no {role.value} instance became ready within {self.wait_timeout:g} s") from None

    # ------------------------------------------------------------------ admission

    def admission(self, request: Request, pool: Any) -> Rejection | None:
        """Refuse early (429) a request that would miss the deployment's SLOs anyway: its
        estimated time to first token (the prefill work queued ahead of it plus its own, through
        the fitted ``overhead + seconds per token × work``), or the measured decode time per
        token while every decode instance is busy. Nothing is refused before the fit has data,
        nor while a prefill instance is idle: a request that starts at once delays nobody, and
        its measured time corrects the fit (refusing every long prompt on a stale estimate would
        keep the fit from ever seeing one again)."""
        spec = self.spec
        prefills = pool.ready(TaskRole.PREFILL)
        if spec.slo_ttft_seconds and prefills and min(_prefill_load(i)[0] for i in prefills) > 0:
            work = min(_prefill_load(i)[1] for i in prefills) + len(request.prompt_token_ids)
            estimate = self.prefill_time.predict(work)
            if estimate is not None and estimate > spec.slo_ttft_seconds:
                return Rejection(message=f"the estimated time to first token ({estimate:.1f} s) exceeds the "
                                         f"deployment's TTFT SLO ({spec.slo_ttft_seconds:g} s); retry later",
                                 status=429, retry_after=max(1.0, estimate - spec.slo_ttft_seconds))
        tpot = self.decode_seconds_per_token.value
        decodes = pool.ready(TaskRole.DECODE)
        if spec.slo_tpot_seconds and tpot and decodes and tpot > spec.slo_tpot_seconds \
                and all(i.stats.scheduler.num_running for i in decodes):
            return Rejection(message=f"decode instances run at {tpot * 1000:.0f} ms per token, over the "
                                     f"deployment's TPOT SLO ({spec.slo_tpot_seconds * 1000:.0f} ms); retry later",
                             status=429, retry_after=1.0)
        return None

    def _release(self, handoff: KVHandoff) -> None:
        try:
            if handoff.transport not in self._transports:
                from flowserve_core.plugins import get_plugin_manager

                self._transports[handoff.transport] = get_plugin_manager().build("kv_transport", handoff.transport,
                                                                                 self.spec)
            self._transports[handoff.transport].release(handoff.locator)
        except Exception as exc:
            log.warning("KV handoff %s could not be released: %s", handoff.locator, exc)


async def _ignore(event: TokenEvent) -> None:
    """The prefill's last event is emitted by the job scheduler itself, edited."""


def _state(last: TokenEvent | None) -> TaskState:
    return {"error": TaskState.FAILED, "abort": TaskState.ABORTED}.get(
        last.finish_reason if last else "error", TaskState.DONE)


def _prefill_load(instance: Instance) -> tuple[int, int]:
    return (getattr(instance, "num_tasks", 0), instance.stats.scheduler.waiting_prefill_tokens)


def _decode_load(instance: Instance) -> tuple[int, int, int]:
    stats = instance.stats
    return (getattr(instance, "num_tasks", 0), stats.scheduler.num_running,
            -(stats.kv.free_blocks + stats.kv.cached_blocks))
