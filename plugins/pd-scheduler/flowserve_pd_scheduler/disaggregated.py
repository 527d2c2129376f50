"""Job scheduler ``pd-disaggregated``: each request is a prefill task on a prefill instance,
then a decode task on a decode instance that imports the prefill's KV.

The decode instance is chosen first, when the request starts (as Mooncake's conductor picks
both ends of a transfer up front): the index of what each decode instance holds
(``prefix_index.py``) says how many leading prompt blocks it has, and the prefill task
carries that as ``KVHandoff.first_block``, so the prefill exports and publishes only the
blocks from there on.

An embedding (``Request.pooling``) has nothing to decode: it is one colocated-role task, run
whole on a prefill instance (placed as a prefill, retried the same way), whose last event
carries the vector.

Placement: a prefill goes to the prefill instance with the fewest prefill tokens queued, then
the fewest tasks, preferring the one that last prefilled the same prompt prefix (its prefix
cache likely holds it) unless it has more than ``pd_locality_slack_tokens`` more queued. A
decode goes to the decode instance with the fewest tasks (in flight, or reserved by prefills
under way) and running sequences, then the most free KV blocks, preferring the one that
holds the longest prefix of the prompt unless it has more than ``pd_locality_slack`` more
tasks.

Options (``DeploymentSpec.options``):

- ``pd_on_failure`` (``reroute`` | ``fail``, default ``reroute``): when a decode instance dies
  mid-request, run the rest on another decode instance (it recomputes the KV from the tokens
  so far: greedy output is unchanged), or end the request with the error; when a prefill
  instance dies, run the prefill again on another one, or end the request with the error.
- ``retry_on_instance_death`` (default 2): attempts per phase on instances that died.
- ``instance_wait_timeout`` (seconds, default 600): how long a task waits for a ready instance.
- ``pd_locality_slack`` (tasks, default 2): how many more tasks the decode instance holding
  the prompt's prefix may have than the least busy one.
- ``pd_locality_slack_tokens`` (tokens, default ``max_num_batched_tokens``): how many more
  queued prefill tokens the prefill instance that last prefilled the prefix may have.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

import msgspec

from flowserve_colocated.estimate import Ewma, LinearFit
from flowserve_colocated.router import ColocatedJobScheduler, InstanceDied
from flowserve_core.deployment import InstancePool
from flowserve_core.factories import KVTransports
from flowserve_core.interfaces import EmitEvent, Instance
from flowserve_core.types import (
    DeploymentSpec,
    InstanceState,
    Job,
    KVHandoff,
    Rejection,
    Request,
    Task,
    TaskRole,
    TaskState,
    TokenEvent,
)
from flowserve_pd_scheduler.placement import LOCALITY_TOKENS, DecodeReservation, waiting_tokens
from flowserve_pd_scheduler.prefix_index import DecodePrefixIndex

log = logging.getLogger(__name__)


class DisaggregatedJobScheduler(ColocatedJobScheduler):
    """Prefill on a prefill instance, KV handed off, decode on a decode instance; SLO-aware
    admission from measured prefill speed and decode time per token."""

    def __init__(self, spec: DeploymentSpec, kv_transports: KVTransports):
        super().__init__(spec, kv_transports)
        options = spec.options
        self.on_failure = str(options.get("pd_on_failure", "reroute"))
        if self.on_failure not in ("reroute", "fail"):
            raise ValueError(f"option pd_on_failure must be 'reroute' or 'fail', got {self.on_failure!r}")
        self.locality_slack = int(options.get("pd_locality_slack", 2))
        self.locality_slack_tokens = int(options.get("pd_locality_slack_tokens", spec.max_num_batched_tokens))
        #: Time to first token against prefill work (tokens queued ahead + new tokens).
        self.prefill_time = LinearFit()
        self._queued_at_placement: dict[str, int] = {}
        self.decode_seconds_per_token = Ewma()
        self._last_prefill_on: collections.OrderedDict[tuple[int, ...], str] = collections.OrderedDict()
        self.prefix_index = DecodePrefixIndex(spec.block_size)
        #: per prefill instance: prompt tokens of the prefills placed there, not yet at their first token
        self._prefill_tokens: collections.Counter[str] = collections.Counter()
        #: per decode instance: requests whose prefill runs and whose decode will go there
        self._decode_reserved: collections.Counter[str] = collections.Counter()

    def make_job(self, request: Request) -> Job:
        """A job of two tasks: prefill, then decode (its first token and KV come from prefill);
        an embedding's: one colocated-role task (see ``run_embedding``)."""
        job = Job(request=request)
        if request.pooling is not None:
            job.tasks = [Task(job_id=job.id, role=TaskRole.COLOCATED, request=request)]
            return job
        job.tasks = [Task(job_id=job.id, role=TaskRole.PREFILL, request=request),
                     Task(job_id=job.id, role=TaskRole.DECODE, request=request)]
        return job

    async def run_job(self, job: Job, pool: InstancePool, emit: EmitEvent) -> None:
        """Run the prefill, hand its KV to a decode instance, stream the decode."""
        if job.request.pooling is not None:
            await self.run_embedding(job, pool, emit)
            return
        job.move_to(TaskState.RUNNING)
        last = await self.run_disaggregated(job.tasks[0], job.tasks[1], pool, emit)
        ends: dict[str | None, TaskState] = {"error": TaskState.FAILED, "abort": TaskState.ABORTED}
        job.move_to(ends.get(last.finish_reason if last else "error", TaskState.DONE))

    async def run_embedding(self, job: Job, pool: InstancePool, emit: EmitEvent) -> None:
        """An embedding's one task, computed whole on a prefill instance (no KV leaves it)."""
        (task,) = job.tasks
        job.move_to(TaskState.RUNNING)
        task.move_to(TaskState.RUNNING)
        forwarded: list[TokenEvent] = []

        async def forward(event: TokenEvent) -> None:
            forwarded.append(event)
            await emit(event)

        last = await self._phase(task, pool, forward, self._place_prefill, forward_last=True)
        if last is not None and (not forwarded or forwarded[-1] is not last):
            await emit(last)  # the instance died: the phase made this end itself
        task.move_to(_state(last))
        job.move_to(_state(last))

    async def run_disaggregated(self, prefill: Task, decode: Task, pool: InstancePool, emit: EmitEvent) -> TokenEvent | None:
        """The two phases of one request; returns the request's last event. The decode
        instance is chosen first, so that the prefill exports only the blocks it lacks."""
        request = prefill.request
        prefill.move_to(TaskState.RUNNING)
        reservation = DecodeReservation(self._decode_reserved, await self._place_decode(pool, set(), request))
        held = self.prefix_index.held(reservation.instance.info.id, self.prefix_index.hashes(request.prompt_token_ids))
        prefill.kv_handoff = KVHandoff(transport=self.spec.kv_transport, locator="", block_size=self.spec.block_size,
                                       num_tokens=len(request.prompt_token_ids), first_block=held)
        try:
            return await self._prefill_then_decode(prefill, decode, pool, emit, reservation)
        finally:
            reservation.end()

    async def _prefill_then_decode(self, prefill: Task, decode: Task, pool: InstancePool, emit: EmitEvent,
                                   reservation: DecodeReservation) -> TokenEvent | None:
        request = prefill.request
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
                              prompt_logprobs=first.prompt_logprobs, num_prompt_tokens=first.num_prompt_tokens,
                              num_cached_tokens=first.num_cached_tokens))
        decode.output_token_ids = list(first.token_ids)
        decode.kv_handoff = first.kv_handoff
        decode.move_to(TaskState.RUNNING)
        try:
            return await self._decode(decode, pool, emit, reservation)
        finally:
            if first.kv_handoff is not None:  # idempotent: the decode side normally released it
                self._release(first.kv_handoff)

    async def _decode(self, decode: Task, pool: InstancePool, emit: EmitEvent,
                      reservation: DecodeReservation | None = None) -> TokenEvent | None:
        """The decode phase, on the reserved instance if it is still ready, rerouted
        (recomputing from the tokens so far) if its instance dies."""
        produced: list[int] = []
        attempt: dict[str, Any] = {}

        async def forward(event: TokenEvent) -> None:
            if event.instance_failed:
                return  # decided below: rerouted, or emitted as the request's end
            if not attempt["started"]:
                attempt["started"] = True
                self._decoding_on(attempt["instance"], attempt["task"], event)
            produced.extend(event.token_ids)
            if event.num_cached_tokens:  # the request's cached prompt tokens are its prefill's
                event = msgspec.structs.replace(event, num_cached_tokens=0)
            await emit(event)

        failed_on: set[str] = set()
        attempts = 0
        while True:
            attempts += 1
            started, before = time.monotonic(), len(produced)
            planned = reservation.instance if reservation is not None and attempts == 1 else None
            if planned is not None and planned.info.state is InstanceState.READY:
                instance = planned
            else:
                instance = await self._place_decode(pool, failed_on, decode.request)
            if reservation is not None:
                reservation.end()  # from here on the instance counts the task itself
            attempt.update(instance=instance, task=decode, started=False)
            try:
                last = await self.run_on(instance, decode, forward)
            except InstanceDied as died:
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
            elif last is not None and last.finish_reason != "error":
                # Its cache now holds every token it computed (all but the last one sampled).
                tokens = list(decode.request.prompt_token_ids) + decode.output_token_ids + produced
                self.prefix_index.add(instance.info.id, self.prefix_index.hashes(tokens[:-1]),
                                      instance.stats.kv.total_blocks)
            if len(produced) > before + 1:
                self.decode_seconds_per_token.add((time.monotonic() - started) / (len(produced) - before))
            decode.move_to(_state(last))
            return last

    def _decoding_on(self, instance: Instance, task: Task, first: TokenEvent) -> None:
        """A decode task's first event: the instance holds the prompt's blocks now (imported
        or recomputed). ``num_cached_tokens`` is what its prefix cache held on admission: less
        than the handoff assumed means the index was wrong (the prompt was recomputed)."""
        prompt = task.request.prompt_token_ids
        handoff = task.kv_handoff
        if handoff is not None and first.num_cached_tokens < handoff.first_block * handoff.block_size:
            self.prefix_index.missed += 1
            log.info("decode instance %s held %d prompt tokens, not the %d its handoff assumed; it recomputed",
                     instance.info.id, first.num_cached_tokens, handoff.first_block * handoff.block_size,
                     extra={"task_id": task.id, "instance": instance.info.id})
        self.prefix_index.add(instance.info.id, self.prefix_index.hashes(prompt), instance.stats.kv.total_blocks)

    async def _phase(self, task: Task, pool: InstancePool, emit: EmitEvent, place: Any, *, forward_last: bool) -> TokenEvent | None:
        """Run ``task`` where ``place`` says, retrying on instances that die before its token."""
        failed_on: set[str] = set()
        attempts = 0
        while True:
            attempts += 1
            instance = await place(pool, failed_on, task.request)
            tokens = len(task.request.prompt_token_ids) if task.role is TaskRole.PREFILL else 0
            self._prefill_tokens[instance.info.id] += tokens
            try:
                return await self.run_on(instance, task, emit if forward_last else _ignore)
            except InstanceDied as died:
                failed_on.add(instance.info.id)
                if self.on_failure == "fail":
                    return TokenEvent(task_id=task.id, finish_reason="error", instance_failed=True,
                                      error=f"{task.role.value} instance {instance.info.id} died: {died.error}")
                if attempts > self.max_retries:
                    last = TokenEvent(task_id=task.id, finish_reason="error",
                                      error=f"{died.error} (gave up after {attempts} attempts)")
                    return last
            finally:
                self._prefill_tokens[instance.info.id] -= tokens
                if self._prefill_tokens[instance.info.id] <= 0:
                    del self._prefill_tokens[instance.info.id]

    def _continues(self, request: Request, first: TokenEvent) -> bool:
        """Whether the request goes on after its prefill's first token."""
        if first.finish_reason != "length":
            return False
        if first.kv_handoff is not None:
            return True
        max_tokens = request.params.max_tokens
        return max_tokens is None or len(first.token_ids) < max_tokens

    # ------------------------------------------------------------------ placement

    def queued_prefill_tokens(self, instance: Instance) -> int:
        """Prefill tokens queued on a prefill instance: what it last reported or, when more,
        the prompts placed there that have no first token yet (a report lags a step behind:
        without this, a burst of arrivals would all go to the instance that last looked idle)."""
        return max(waiting_tokens(instance), self._prefill_tokens.get(instance.info.id, 0))

    def _prefill_key(self, instance: Instance) -> tuple[int, int]:
        return self.queued_prefill_tokens(instance), instance.num_tasks

    async def _place_prefill(self, pool: InstancePool, avoid: set[str], request: Request) -> Instance:
        ready = [i for i in await self._ready(pool, TaskRole.PREFILL) if i.info.id not in avoid] or \
            await self._ready(pool, TaskRole.PREFILL)
        lightest = min(ready, key=self._prefill_key)
        key = tuple(request.prompt_token_ids[:LOCALITY_TOKENS])
        if len(key) == LOCALITY_TOKENS:
            local = next((i for i in ready if i.info.id == self._last_prefill_on.get(key)), None)
            if local is not None and self.queued_prefill_tokens(local) <= \
                    self.queued_prefill_tokens(lightest) + self.locality_slack_tokens:
                lightest = local
            self._last_prefill_on[key] = lightest.info.id
            self._last_prefill_on.move_to_end(key)
            while len(self._last_prefill_on) > 4096:
                self._last_prefill_on.popitem(last=False)
        self._queued_at_placement[request.id] = self.queued_prefill_tokens(lightest)
        return lightest

    def _decode_key(self, instance: Instance) -> tuple[int, int, int]:
        stats = instance.stats
        return (instance.num_tasks + self._decode_reserved.get(instance.info.id, 0), stats.scheduler.num_running,
                -(stats.kv.free_blocks + stats.kv.cached_blocks))

    async def _place_decode(self, pool: InstancePool, avoid: set[str], request: Request | None = None) -> Instance:
        ready = await self._ready(pool, TaskRole.DECODE)
        self.prefix_index.keep(set(pool.instances))
        candidates = [i for i in ready if i.info.id not in avoid] or ready
        lightest = min(candidates, key=self._decode_key)
        if request is None:
            return lightest
        hashes = self.prefix_index.hashes(request.prompt_token_ids)
        held = {i.info.id: self.prefix_index.held(i.info.id, hashes) for i in candidates}
        holder = min(candidates, key=lambda i: (-held[i.info.id], self._decode_key(i)))
        if held[holder.info.id] > held[lightest.info.id] and \
                self._decode_key(holder)[0] <= self._decode_key(lightest)[0] + self.locality_slack:
            return holder
        return lightest

    async def _ready(self, pool: InstancePool, role: TaskRole) -> list[Instance]:
        try:
            return await pool.wait_ready(role, timeout=self.wait_timeout)
        except TimeoutError:
            raise TimeoutError(f"no {role.value} instance became ready within {self.wait_timeout:g} s") from None

    # ------------------------------------------------------------------ admission

    def admission(self, request: Request, pool: InstancePool) -> Rejection | None:
        """Refuse early (429) a request that would miss the deployment's SLOs anyway: its
        estimated time to first token (the prefill work queued ahead of it plus its own, through
        the fitted ``overhead + seconds per token × work``), or the measured decode time per
        token while every decode instance is busy. Nothing is refused before the fit has data,
        nor while a prefill instance is idle: a request that starts at once delays nobody, and
        its measured time corrects the fit (refusing every long prompt on a stale estimate would
        keep the fit from ever seeing one again)."""
        spec = self.spec
        prefills = pool.ready(TaskRole.PREFILL)
        if spec.slo_ttft_seconds and prefills and min(i.num_tasks for i in prefills) > 0:
            work = min(self.queued_prefill_tokens(i) for i in prefills) + len(request.prompt_token_ids)
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
        """Drop a handoff. The release runs in a daemon thread: a transport may connect to
        its publisher (and wait out a timeout if that one died), which must not hold up the
        server's loop; the transport is built here, on the loop (a constructor may connect
        to a cluster)."""
        if not handoff.locator:
            return
        try:
            transport = self.kv_transports(handoff.transport)
        except Exception as exc:
            log.warning("KV handoff %s could not be released: %s", handoff.locator, exc)
            return
        threading.Thread(target=_release_now, args=(transport, handoff.locator), name="flowserve-kv-release",
                         daemon=True).start()


async def _ignore(event: TokenEvent) -> None:
    """The prefill's last event is emitted by the job scheduler itself, edited."""


def _release_now(transport: Any, locator: str) -> None:
    try:
        transport.release(locator)
    except Exception as exc:
        log.warning("KV handoff %s could not be released: %s", locator, exc)


def _state(last: TokenEvent | None) -> TaskState:
    ends: dict[str | None, TaskState] = {"error": TaskState.FAILED, "abort": TaskState.ABORTED}
    return ends.get(last.finish_reason if last else "error", TaskState.DONE)
