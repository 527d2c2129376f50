"""Batch scheduler ``continuous``: continuous batching with chunked prefill and a token budget.

Each step, first every running sequence that is decoding gets its one token, then prefill
work fills the rest of ``max_num_batched_tokens``: running sequences whose prompt is only
partly computed, then waiting sequences in arrival order (first come, first served). A prompt
longer than what is left of the budget is computed in chunks over several steps; only the
chunk that reaches its end samples. When blocks run out, the latest-arrived running sequence
is preempted: its blocks are freed and it waits again, to be recomputed (prompt and the tokens
it generated) when blocks are free. See docs/scheduling.md.

Extension points for PD-disaggregation (prefill-only and decode-only tasks) are the three
methods ``_admit`` (get blocks for a waiting sequence), ``_finish_reason`` (when a sequence
ends) and ``_release`` (what happens to its blocks then); ``add`` refuses those roles today.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from typing import Any

from flowserve_core.types import (
    DeploymentSpec, FinishReason, KVUsage, SchedulerStats, ScheduledSequence, StepBatch,
    StepResult, Task, TaskRole, TokenEvent,
)

from flowserve_colocated.sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class ContinuousBatchScheduler:
    """Decode first, then chunked prefill within a per-step token budget; preempt by recompute.

    Works with any ``KVCacheManager``; with the ``paged`` one it also forwards copy-on-write
    block copies (``take_block_copies``). ``request.priority`` is not used: the order is first
    come, first served by ``request.arrival_time``.
    """

    def __init__(self, spec: DeploymentSpec, kv_cache: Any):
        self.spec = spec
        self.kv = kv_cache
        self.max_num_seqs = spec.max_num_seqs
        self.token_budget = spec.max_num_batched_tokens
        lengths = [n for n in (spec.max_model_len, getattr(kv_cache, "max_model_len", None)) if n]
        self.max_model_len: int = min(lengths) if lengths else 2048
        self.block_size: int = kv_cache.block_size
        self.total_blocks: int = kv_cache.usage().total_blocks
        self.seqs: dict[str, Sequence] = {}
        self.waiting: list[Sequence] = []  # sorted by key
        self.running: list[Sequence] = []  # sorted by key
        self.num_preemptions = 0
        self._ended: list[str] = []  # for the next batch's finished_seq_ids
        self._order = itertools.count()

    # ------------------------------------------------------------------ admission

    def add(self, task: Task) -> None:
        """Queue ``task``; ``ValueError`` if it can never run here (the message says why)."""
        if task.id in self.seqs:
            raise ValueError(f"task {task.id} is already scheduled on this instance")
        if task.role is not TaskRole.COLOCATED:
            raise ValueError(f"batch scheduler 'continuous' runs colocated tasks only; task {task.id} "
                             f"has role {task.role.value!r} (PD roles need a PD scheduler plugin)")
        if not task.request.prompt_token_ids:
            raise ValueError(f"task {task.id}: the prompt is empty")
        seq = Sequence(task, next(self._order))
        self._check_fits(seq)
        self.seqs[seq.seq_id] = seq
        bisect.insort(self.waiting, seq)

    def _check_fits(self, seq: Sequence) -> None:
        """Refuse what could never run, so that ``schedule`` can always make progress: a
        sequence alone in the cache must fit at its longest."""
        if seq.num_tokens >= self.max_model_len:
            raise ValueError(f"task {seq.seq_id}: the prompt has {seq.num_tokens} tokens but the "
                             f"context length is {self.max_model_len}, which leaves no room for output")
        max_tokens = seq.params.max_tokens
        longest = self.max_model_len if max_tokens is None else \
            min(len(seq.prompt_token_ids) + max_tokens, self.max_model_len)
        slots = longest - 1  # the last sampled token is never fed back
        blocks = _ceil_div(slots, self.block_size)
        if blocks > self.total_blocks:
            raise ValueError(
                f"task {seq.seq_id} needs KV for up to {slots} tokens ({blocks} blocks of "
                f"{self.block_size}) but the whole KV cache has {self.total_blocks} blocks "
                f"({self.total_blocks * self.block_size} tokens); lower max_tokens or give the "
                f"cache more memory")

    def abort(self, task_id: str) -> TokenEvent | None:
        """Drop ``task_id`` wherever it is; its blocks are freed. None if unknown or ended."""
        seq = self.seqs.get(task_id)
        if seq is None:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
            self._ended.append(seq.seq_id)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        del self.seqs[task_id]
        return self._event(seq, [], None, "abort")

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ------------------------------------------------------------------ one step

    def schedule(self) -> StepBatch:
        """Choose this step's work within the token budget. ``seqs`` lists the decodes (one
        token each) first, then the prefill chunks, each group first come first served."""
        planned: dict[str, tuple[Sequence, int]] = {}  # seq_id → (sequence, tokens this step)
        preempted: set[str] = set()
        budget = self.token_budget

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
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.seq_id in preempted:
                break  # it just gave its blocks up; its id is in this batch's finished list
            num_cached = self._admit(seq)
            if num_cached is None:
                break  # strict FCFS: nobody overtakes the head of the queue
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            seq.num_computed = num_cached
            if not seq.admitted:
                seq.admitted, seq.num_cached_tokens = True, num_cached
            bisect.insort(self.running, seq)
            chunk = min(seq.num_remaining, budget)
            planned[seq.seq_id] = (seq, chunk)
            budget -= chunk

        ended, self._ended = self._ended, []
        if not planned:
            self._ended = ended  # an empty batch is never executed: report them next time
            return StepBatch()
        copies = self.kv.take_block_copies() if hasattr(self.kv, "take_block_copies") else []
        # Planning order: decodes first, then prefill chunks, each first come first served.
        return StepBatch(seqs=[self._scheduled(seq, n) for seq, n in planned.values()],
                         finished_seq_ids=ended, block_copies=copies)

    def _scheduled(self, seq: Sequence, num_tokens: int) -> ScheduledSequence:
        start = seq.num_computed
        return ScheduledSequence(
            seq_id=seq.seq_id, token_ids=seq.token_ids[start:start + num_tokens], start_pos=start,
            block_table=self.kv.block_table(seq.seq_id), sample=start + num_tokens == seq.num_tokens,
            # The prompt list is never mutated, so it is shared; outputs grow, so they are copied.
            params=seq.params, prompt_token_ids=seq.prompt_token_ids,
            output_token_ids=list(seq.output_token_ids), eos_token_ids=seq.banned_until_min_tokens)

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and queue it again; it will be recomputed from its tokens."""
        self.running.remove(seq)
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
        for scheduled in batch.seqs:
            seq = self.seqs.get(scheduled.seq_id)
            if seq is None or seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed = scheduled.start_pos + len(scheduled.token_ids)
            self.kv.commit(seq.seq_id, seq.token_ids, seq.num_computed)
            if not scheduled.sample:
                continue
            token = result.token_ids.get(seq.seq_id)
            if token is None:
                self._end(seq)
                events.append(self._event(seq, [], None, "error",
                                          error=f"the executor returned no token for {seq.seq_id}"))
                continue
            seq.append(token)
            reason = self._finish_reason(seq, token)
            logprob = result.logprobs.get(seq.seq_id)
            events.append(self._event(seq, [token], [logprob] if logprob else None, reason))
            if reason:
                self._end(seq)
        return events

    def _event(self, seq: Sequence, tokens: list[int], logprobs: Any, reason: FinishReason | None,
               error: str | None = None) -> TokenEvent:
        cached = 0 if seq.reported_first else seq.num_cached_tokens
        seq.reported_first = True
        return TokenEvent(task_id=seq.seq_id, token_ids=tokens, logprobs=logprobs,
                          finish_reason=reason, error=error,
                          num_prompt_tokens=len(seq.prompt_token_ids), num_cached_tokens=cached)

    def _end(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        del self.seqs[seq.seq_id]
        self._release(seq)
        self._ended.append(seq.seq_id)

    # ------------------------------------------------------------------ role extension points

    def _admit(self, seq: Sequence) -> int | None:
        """Blocks for a waiting sequence: how many leading tokens are already computed, or
        None if the cache cannot hold it now. (A decode task would import its KV here.)"""
        return self.kv.allocate(seq.seq_id, seq.token_ids)

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        """Why ``seq`` ends after sampling ``token``. (A prefill task would end right here.)"""
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
        """Running and waiting counts; prefill tokens not yet computed (waiting sequences'
        tokens and the rest of prompts under way); preemptions so far."""
        prefill = sum(s.num_tokens for s in self.waiting) + \
            sum(s.num_remaining for s in self.running if s.num_remaining > 1)
        return SchedulerStats(num_running=len(self.running), num_waiting=len(self.waiting),
                              waiting_prefill_tokens=prefill, num_preemptions=self.num_preemptions)

    def kv_usage(self) -> KVUsage:
        return self.kv.usage()
