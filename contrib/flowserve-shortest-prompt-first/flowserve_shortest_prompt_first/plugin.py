"""Batch scheduler ``shortest-prompt-first``: ``continuous``, admitting the shortest prompt first.

Waiting tasks are ordered by prompt length, then arrival, instead of by arrival alone, so
short requests are not stuck behind long prompts: a lower mean time to first token under a
mix of lengths, at the price that a long prompt waits while shorter ones keep coming. The
mechanics (decodes first, chunked prefill in the token budget, preemption by recompute) are
``continuous``'s; a preempted sequence rejoins the queue by its prompt length, and when
blocks run out the running sequence with the longest prompt is preempted first.
"""

from __future__ import annotations

from typing import Any

from flowserve_colocated import ContinuousBatchScheduler, Sequence
from flowserve_core import hookimpl
from flowserve_core.factories import BatchSchedulerFactory, Register


class ShortestPromptFirstScheduler(ContinuousBatchScheduler):
    """Continuous batching whose queue (and preemption) order is prompt length, then arrival."""

    def queue_key(self, seq: Sequence) -> tuple[Any, ...]:
        """Prompt length first, then ``continuous``'s order (arrival time, admission order)."""
        return (len(seq.prompt_token_ids), *super().queue_key(seq))


@hookimpl
def flowserve_register_batch_schedulers(register: Register[BatchSchedulerFactory]) -> None:
    """Register ``shortest-prompt-first`` (``flowserve serve --batch-scheduler shortest-prompt-first``)."""
    register("shortest-prompt-first", ShortestPromptFirstScheduler)
