"""Batch scheduler ``continuous``: continuous batching with chunked prefill and a token budget.

Each step, first every running sequence that is decoding gets its one token, then prefill
work fills the rest of ``max_num_batched_tokens``: running sequences whose prompt is only
partly computed, then waiting sequences in arrival order (first come, first served). A prompt
longer than what is left of the budget is computed in chunks over several steps; only the
chunk that reaches its end samples. When blocks run out, the latest-arrived running sequence
is preempted: its blocks are freed and it waits again, to be recomputed (prompt and the tokens
it generated) when blocks are free. With ``decode_steps`` > 1, a batch of decodes alone, while
no waiting sequence could start, asks each for several tokens (multi-step decoding,
``multistep.py``). See docs/scheduling.md. An embedding's task
(``Request.pooling``) is a prompt computed the same way: the chunk that reaches its end brings
the vector (``StepResult.embeddings``) instead of a token, and the task ends there (``stop``);
mean pooling computes every position (no prefix-cache hits).

PD-disaggregation roles (the mechanics are in ``handoff.py``): a **prefill** task ends
after its first token; the step that samples it also exports the prompt's KV blocks from the
first one its decode instance lacks (``StepBatch.kv_exports``), which are published through
the deployment's KV transport, and the task's last event carries the ``KVHandoff``. A
**decode** task (prompt and first token, plus that handoff) gets its blocks through the
prefix cache, then waits, holding them, while a worker thread fetches the handoff (the other
sequences keep stepping); the blocks its cache lacks are imported (``StepBatch.kv_imports``)
before its first decode step. If the fetch fails it recomputes the prompt instead.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from typing import Any

from flowserve_colocated.fits import check_fits
from flowserve_colocated.handoff import KVHandoffs
from flowserve_colocated.multistep import accept_tokens, plan_decode_steps
from flowserve_colocated.sequence import Sequence, SequenceStatus
from flowserve_core.factories import KVTransports
from flowserve_core.interfaces import (
    AllocatesUncached,
    BlockCopySource,
    KVCacheManager,
    KVTransport,
    ReleasesOutOfWindow,
    ReportsContextLength,
)
from flowserve_core.types import (
    DeploymentSpec,
    FinishReason,
    KVHandoff,
    KVUsage,
    ScheduledSequence,
    SchedulerStats,
    StepBatch,
    StepResult,
    Task,
    TaskRole,
    TokenEvent,
)

log = logging.getLogger(__name__)


class ContinuousBatchScheduler:
    """Decode first, then chunked prefill within a per-step token budget; preempt by recompute.

    Works with any ``KVCacheManager``; with one that copies blocks on write (a
    ``BlockCopySource``, as ``paged``) it also forwards the copies. ``request.priority`` is
    not used: the order is first come, first served by ``request.arrival_time``.

    Subclasses change the policy through two public methods: ``queue_key`` (the order in which
    waiting sequences start and running ones are preempted) and ``finish_reason`` (when a
    sequence ends). ``add`` may be extended (call ``super().add``); the rest is mechanics.
    """

    def __init__(self, spec: DeploymentSpec, kv_cache: KVCacheManager, kv_transports: KVTransports):
        self.spec = spec
        self.kv = kv_cache
        # Asked once: an isinstance against a runtime Protocol costs microseconds, every step.
        self._copies_from: BlockCopySource | None = kv_cache if isinstance(kv_cache, BlockCopySource) else None
        self._window: ReleasesOutOfWindow | None = kv_cache if isinstance(kv_cache, ReleasesOutOfWindow) else None
        self._uncached: AllocatesUncached | None = kv_cache if isinstance(kv_cache, AllocatesUncached) else None
        self.max_num_seqs = spec.max_num_seqs
        self.token_budget = spec.max_num_batched_tokens
        from_cache = kv_cache.max_model_len if isinstance(kv_cache, ReportsContextLength) else None
        lengths = [n for n in (spec.max_model_len, from_cache) if n]
        self.max_model_len: int = min(lengths) if lengths else 2048
        self.block_size: int = kv_cache.block_size
        self.total_blocks: int = kv_cache.usage().total_blocks
        self.seqs: dict[str, Sequence] = {}
        self.waiting: list[Sequence] = []  # sorted by key
        self.running: list[Sequence] = []  # sorted by key
        self.num_preemptions = 0
        self._ended: list[str] = []  # for the next batch's finished_seq_ids
        self._order = itertools.count()
        self._handoffs: dict[str, KVHandoff] = {}  # decode tasks not admitted yet: the KV to fetch
        self.handoffs = KVHandoffs(spec, kv_cache, kv_transports)

    # ------------------------------------------------------------------ admission

    def add(self, task: Task) -> None:
        """Queue ``task``; ``ValueError`` if it can never run here (the message says why)."""
        if task.id in self.seqs:
            raise ValueError(f"task {task.id} is already scheduled on this instance")
        if task.role is TaskRole.DECODE and not task.output_token_ids:
            raise ValueError(f"decode task {task.id} has no first token from its prefill")
        if not task.request.prompt_token_ids:
            raise ValueError(f"task {task.id}: the prompt is empty")
        seq = Sequence(task, next(self._order))
        seq.key = self.queue_key(seq)
        check_fits(seq, self.max_model_len, self.block_size, self.total_blocks)
        self.seqs[seq.seq_id] = seq
        if task.role is TaskRole.DECODE and task.kv_handoff is not None:
            self._handoffs[seq.seq_id] = task.kv_handoff
        bisect.insort(self.waiting, seq)

    def queue_key(self, seq: Sequence) -> tuple[Any, ...]:
        """The sort key of ``seq`` in the waiting and running queues, asked once when its task is
        queued (a preempted sequence keeps it). The smallest key starts first and is preempted
        last; the head of the waiting queue is never overtaken. The default is first come,
        first served: ``(arrival time, seq.order)``. An override puts its policy in front, e.g.
        ``(len(seq.prompt_token_ids), *super().queue_key(seq))``; keep the default's items at
        the end, so that keys stay unique and every two keys compare."""
        return (seq.task.request.arrival_time, seq.order)

    def abort(self, task_id: str) -> TokenEvent | None:
        """Drop ``task_id`` wherever it is; its blocks are freed. None if unknown or ended."""
        seq = self.seqs.get(task_id)
        if seq is None:
            return None
        self.handoffs.cancel(task_id)
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
            self._ended.append(seq.seq_id)
        elif seq.status is SequenceStatus.FETCHING:
            self.kv.free(seq.seq_id)  # the executor never saw it: nothing to report as ended
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        del self.seqs[task_id]
        if (handoff := self._handoffs.pop(task_id, None)) is not None:
            self._release_handoff(handoff.locator)
        return self._event(seq, [], None, "abort")

    def has_work(self) -> bool:
        """Sequences to run, or fetches under way (the engine polls ``schedule`` until they end)."""
        return bool(self.running or self.waiting or self.handoffs.busy)

    # ------------------------------------------------------------------ one step

    def schedule(self) -> StepBatch:
        """Choose this step's work within the token budget. ``seqs`` lists the decodes (one
        token each) first, then the prefill chunks, each group first come first served."""
        planned: dict[str, tuple[Sequence, int]] = {}  # seq_id → (sequence, tokens this step)
        preempted: set[str] = set()
        budget = self.token_budget
        # Decode tasks whose KV fetch ended run from now on (imported, or recomputing).
        for seq, num_computed in self.handoffs.collect():
            seq.status, seq.num_computed = SequenceStatus.RUNNING, num_computed
            bisect.insort(self.running, seq)

        def plan(seq: Sequence, num_tokens: int) -> bool:
            """Reserve blocks (preempting later arrivals if needed) and plan ``seq``."""
            nonlocal budget
            while not self.kv.append_slots(seq.seq_id, seq.num_computed + num_tokens):
                victim = self.running[-1]  # the latest arrival
                self._preempt(victim)
                preempted.add(victim.seq_id)
                if victim.seq_id in planned:
                    budget += planned.pop(victim.seq_id)[1]
                if victim is seq:
                    return False
            planned[seq.seq_id] = (seq, num_tokens)
            budget -= num_tokens
            return True

        # 1. Decode first: one token for every running sequence that finished its prompt.
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is SequenceStatus.RUNNING and seq.num_remaining == 1:
                plan(seq, 1)
        # 2. Prompts already under way continue, chunk by chunk.
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is SequenceStatus.RUNNING and seq.seq_id not in planned:
                plan(seq, min(seq.num_remaining, budget))
        # 3. Waiting sequences start, first come first served, while blocks and slots last.
        while self.waiting and budget > 0 and len(self.running) + len(self.handoffs.fetching) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.seq_id in preempted:
                break  # it just gave its blocks up; its id is in this batch's finished list
            num_cached = self._admit(seq)
            if num_cached is None:
                break  # strict FCFS: nobody overtakes the head of the queue
            self.waiting.pop(0)
            if seq.status is SequenceStatus.FETCHING:
                continue  # it holds its blocks and runs once its KV is here; the next may start
            seq.status = SequenceStatus.RUNNING
            seq.num_computed = num_cached
            bisect.insort(self.running, seq)
            chunk = min(seq.num_remaining, budget)
            planned[seq.seq_id] = (seq, chunk)
            budget -= chunk

        ended, self._ended = self._ended, []
        if not planned:
            self._ended = ended  # an empty batch is never executed: report them next time
            return StepBatch()
        # Several tokens a decode only while no waiting sequence could start in the meantime.
        idle = not self.handoffs.busy and (not self.waiting or len(self.running) >= self.max_num_seqs)
        steps = plan_decode_steps([seq for seq, _ in planned.values()], self.spec.decode_steps if idle else 1,
                                  self.max_model_len, self.kv)
        copies = self._copies_from.take_block_copies() if self._copies_from is not None else []
        # Planning order: decodes first, then prefill chunks, each first come first served.
        scheduled = [self._scheduled(seq, n, steps.get(seq.seq_id, 1)) for seq, n in planned.values()]
        exports = [export for s in scheduled if s.sample and s.pooling is None
                   and (export := self.handoffs.export(self.seqs[s.seq_id], s.block_table)) is not None]
        return StepBatch(seqs=scheduled, finished_seq_ids=ended, block_copies=copies,
                         kv_imports=self.handoffs.take_imports(), kv_exports=exports)

    def _scheduled(self, seq: Sequence, num_tokens: int, decode_steps: int = 1) -> ScheduledSequence:
        start = seq.num_computed
        return ScheduledSequence(
            seq_id=seq.seq_id, token_ids=seq.token_ids[start:start + num_tokens], start_pos=start,
            block_table=self.kv.block_table(seq.seq_id), sample=start + num_tokens == seq.num_tokens,
            # The prompt list is never mutated, so it is shared; outputs grow, so they are copied.
            params=seq.params, prompt_token_ids=seq.prompt_token_ids,
            output_token_ids=list(seq.output_token_ids), eos_token_ids=seq.banned_until_min_tokens,
            pooling=seq.pooling, decode_steps=decode_steps)

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and queue it again; it will be recomputed from its tokens."""
        self.running.remove(seq)
        self.handoffs.cancel(seq.seq_id)  # an import not run yet would write blocks it no longer holds
        self.kv.free(seq.seq_id)
        seq.status = SequenceStatus.WAITING
        seq.num_computed = 0
        bisect.insort(self.waiting, seq)
        self.num_preemptions += 1
        self._ended.append(seq.seq_id)
        log.debug("preempted %s", seq.seq_id, extra={"seq_id": seq.seq_id, "tokens": seq.num_tokens})

    def update(self, batch: StepBatch, result: StepResult) -> list[TokenEvent]:
        """Commit what was computed, append sampled tokens, end sequences; one event per token."""
        events: list[TokenEvent] = []
        self.handoffs.imported(batch.kv_imports)  # the step ran: the fetched data is not needed any more
        exported = {transfer.seq_id: transfer.data for transfer in result.kv_exports}
        for scheduled in batch.seqs:
            seq = self.seqs.get(scheduled.seq_id)
            if seq is None or seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed = scheduled.start_pos + len(scheduled.token_ids)
            self.kv.commit(seq.seq_id, seq.token_ids, seq.num_computed)
            if (scored := result.prompt_logprobs.get(seq.seq_id)) is not None:
                seq.add_prompt_logprobs(scheduled.start_pos, scored)
            if self._window is not None and seq.role is not TaskRole.PREFILL:  # a prefill's KV is exported whole
                self._window.release_out_of_window(seq.seq_id)
            if not scheduled.sample:
                continue
            if seq.pooling is not None:
                events.append(self._pooled(seq, result.embeddings.get(seq.seq_id)))
                continue
            token = result.token_ids.get(seq.seq_id)
            if token is None:
                self._end(seq)
                events.append(self._event(seq, [], None, "error",
                                          error=f"the executor returned no token for {seq.seq_id}"))
                continue
            if seq.params.prompt_logprobs is not None and seq.needs_every_position and \
                    len(seq.prompt_logprobs) < len(seq.prompt_token_ids) - 1:
                self._end(seq)  # an executor that scores no prompt: say so, never answer without them
                events.append(self._event(seq, [], None, "error", error=(
                    f"the executor {self.spec.executor!r} scored {len(seq.prompt_logprobs)} of the prompt's "
                    f"{len(seq.prompt_token_ids) - 1} tokens after the first: it does not compute prompt_logprobs")))
                continue
            tokens, reason = accept_tokens(seq, [token, *result.more_token_ids.get(seq.seq_id, ())],
                                           scheduled.decode_steps, self.finish_reason, self.kv)
            logprob = result.logprobs.get(seq.seq_id)
            logprobs = [logprob, *result.more_logprobs.get(seq.seq_id, ())][:len(tokens)] if logprob else None
            handoff = None
            if seq.role is TaskRole.PREFILL and reason is None:
                # The prefill task's job is done; a decode task goes on from this handoff.
                reason, handoff = "length", self._publish(seq, exported.get(seq.seq_id))
            events.append(self._event(seq, tokens, logprobs, reason, handoff=handoff))
            if reason:
                self._end(seq)
        return events

    def _event(self, seq: Sequence, tokens: list[int], logprobs: Any, reason: FinishReason | None,
               error: str | None = None, handoff: KVHandoff | None = None) -> TokenEvent:
        first = not seq.reported_first
        seq.reported_first = True
        # the prompt's scores go with the first event of a task that computed them all
        scored = first and seq.params.prompt_logprobs is not None and seq.needs_every_position
        return TokenEvent(task_id=seq.seq_id, token_ids=tokens, logprobs=logprobs,
                          finish_reason=reason, error=error, kv_handoff=handoff,
                          num_prompt_tokens=len(seq.prompt_token_ids),
                          num_cached_tokens=seq.num_cached_tokens if first else 0,
                          prompt_logprobs=seq.prompt_logprobs if scored else None)

    def _pooled(self, seq: Sequence, embedding: list[float] | None) -> TokenEvent:
        """An embedding's prompt is computed: it ends, with its vector (nothing is sampled)."""
        if embedding is None:
            event = self._event(seq, [], None, "error", error=f"the executor returned no embedding for {seq.seq_id} "
                                                              f"(executor {self.spec.executor!r})")
        else:
            event = self._event(seq, [], None, "stop")
            event.embedding = embedding
        self._end(seq)
        return event

    def _end(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        del self.seqs[seq.seq_id]
        self._release(seq)
        self._ended.append(seq.seq_id)

    # ------------------------------------------------------------------ role extension points

    def _admit(self, seq: Sequence) -> int | None:
        """Blocks for a waiting sequence: how many leading tokens are already computed, or
        None if the cache cannot hold it now. A decode task whose prefix cache lacks blocks of
        its handoff starts fetching it and becomes ``FETCHING``; it runs when ``schedule``
        collects the fetch (see ``handoff.py``)."""
        if seq.needs_every_position and self._uncached is not None:
            num_cached = self._uncached.allocate_uncached(seq.seq_id, seq.token_ids)
        else:
            num_cached = self.kv.allocate(seq.seq_id, seq.token_ids)
        if num_cached is None:
            return None
        if seq.needs_every_position:
            num_cached = 0  # a manager that cannot skip its hits: the cached KV is written again, unchanged
        if not seq.admitted:  # what the prefix cache held, not what a handoff brings
            seq.admitted, seq.num_cached_tokens = True, num_cached
        handoff = self._handoffs.pop(seq.seq_id, None)
        if handoff is not None and self.handoffs.fetch(seq, handoff, num_cached):
            seq.status = SequenceStatus.FETCHING
        return num_cached

    def transport(self) -> KVTransport:
        """The deployment's KV transport (``spec.kv_transport``), built on first use."""
        return self.handoffs.transport()

    def _publish(self, seq: Sequence, data: Any) -> KVHandoff | None:
        """Publish a finished prefill's KV; None (the decode side recomputes) if there is none."""
        return self.handoffs.publish(seq, data)

    def _release_handoff(self, locator: str) -> None:
        self.handoffs.release(locator)

    def finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        """Why ``seq`` ends after sampling ``token`` (already appended to its tokens), or None
        if it goes on: ``stop`` (a stop token, once ``min_tokens`` are out) or ``length``
        (``max_tokens`` or the context length). A subclass may end sequences on rules of its
        own, calling ``super().finish_reason`` for these. (A prefill task ends after its first
        token whatever this says, unless it says the request ends.)"""
        params, produced = seq.params, len(seq.output_token_ids)
        if token in seq.stop_token_ids and produced >= params.min_tokens:
            return "stop"
        if params.max_tokens is not None and produced >= params.max_tokens:
            return "length"
        if seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _release(self, seq: Sequence) -> None:
        """What happens to an ended sequence's blocks: freed (hashed ones stay cached).
        (A prefill task would keep them until its KV is exported.)"""
        self.kv.free(seq.seq_id)

    # ------------------------------------------------------------------ load

    def stats(self) -> SchedulerStats:
        """Running (decode tasks fetching their KV included) and waiting counts; prefill
        tokens not yet computed (waiting sequences' tokens and the rest of prompts under way);
        preemptions so far; KV imported from handoffs (bytes written into this cache, and
        the wall time of the transport's fetches, which run in worker threads)."""
        prefill = sum(s.num_tokens for s in self.waiting) + \
            sum(s.num_remaining for s in self.running if s.num_remaining > 1)
        # A decode task fetching its KV holds its blocks and a batch slot: it counts as running.
        return SchedulerStats(num_running=len(self.running) + len(self.handoffs.fetching),
                              num_waiting=len(self.waiting), waiting_prefill_tokens=prefill,
                              num_preemptions=self.num_preemptions, kv_transfer_bytes=self.handoffs.bytes,
                              kv_transfer_seconds=self.handoffs.seconds)

    def kv_usage(self) -> KVUsage:
        return self.kv.usage()
