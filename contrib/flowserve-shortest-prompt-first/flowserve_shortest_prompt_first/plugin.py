"""Batch scheduler ``shortest-prompt-first``: ``continuous``, admitting the shortest prompt first.

Waiting tasks are ordered by prompt length, then arrival, instead of by arrival alone, so
short requests are not stuck behind long prompts: a lower mean time to first token under a
mix of lengths, at the price that a long prompt waits while shorter ones keep coming. The
mechanics (decodes first, chunked prefill in the token budget, preemption by recompute) are
``continuous``'s; a preempted sequence rejoins the queue by its prompt length, and when
blocks run out the running sequence with the longest prompt is preempted first.
"""

from __future__ import annotations

import bisect
from typing import Any

from flowserve_colocated.scheduler import ContinuousBatchScheduler
from flowserve_core import hookimpl
from flowserve_core.types import Task


class ShortestPromptFirstScheduler(ContinuousBatchScheduler):
    """Continuous batching whose queue (and preemption) order is prompt length, then arrival."""

    def add(self, task: Task) -> None:
        """Queue ``task`` by its prompt length (``ValueError`` if it can never run here)."""
        super().add(task)
        sequence = self.seqs[task.id]
        # ``continuous`` orders its queues by ``Sequence.key`` (arrival time, admission order).
        self.waiting.remove(sequence)
        sequence.key = (len(sequence.prompt_token_ids), *sequence.key)
        bisect.insort(self.waiting, sequence)


@hookimpl
def flowserve_register_batch_schedulers(register: Any) -> None:
    """Register ``shortest-prompt-first`` (``flowserve serve --batch-scheduler shortest-prompt-first``)."""
    register("shortest-prompt-first", ShortestPromptFirstScheduler)
