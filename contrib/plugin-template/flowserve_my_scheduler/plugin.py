"""Batch scheduler ``my-scheduler``: FlowServe's ``continuous`` scheduler, ready for your policy.

``continuous`` (from flowserve-colocated) does the mechanics: decodes first, chunked prefill
within ``max_num_batched_tokens``, prefix caching through the KV cache manager, preemption
when blocks run out. This subclass logs and counts every task it queues, so you can see it
at work. Make it yours through ``continuous``'s public methods: ``queue_key`` (the order in
which tasks start and are preempted), ``finish_reason`` (when a sequence ends) and ``add``
(admission). Its tests hold it to the ``BatchScheduler`` Protocol.
"""

from __future__ import annotations

import logging
from typing import Any

from flowserve_colocated import ContinuousBatchScheduler, Sequence
from flowserve_core import hookimpl
from flowserve_core.factories import BatchSchedulerFactory, KVTransports, Register
from flowserve_core.interfaces import KVCacheManager
from flowserve_core.types import DeploymentSpec, Task

log = logging.getLogger(__name__)


class MyScheduler(ContinuousBatchScheduler):
    """The ``continuous`` batch scheduler that logs and counts the tasks it queues."""

    def __init__(self, spec: DeploymentSpec, kv_cache: KVCacheManager, kv_transports: KVTransports):
        super().__init__(spec, kv_cache, kv_transports)
        self.num_queued = 0

    def add(self, task: Task) -> None:
        """Queue ``task`` (``ValueError`` if it can never run here), then log it."""
        super().add(task)
        self.num_queued += 1
        log.info("my-scheduler queued task %s (%d prompt tokens)", task.id, len(task.request.prompt_token_ids),
                 extra={"task_id": task.id, "batch_scheduler": "my-scheduler"})

    def queue_key(self, seq: Sequence) -> tuple[Any, ...]:
        """Where ``seq`` goes in the queues, smallest first: ``continuous``'s order, first come
        first served. Put your policy's items in front: ``(len(seq.prompt_token_ids),
        *super().queue_key(seq))`` would start the shortest prompt first."""
        return super().queue_key(seq)


@hookimpl
def flowserve_register_batch_schedulers(register: Register[BatchSchedulerFactory]) -> None:
    """Register ``my-scheduler``; choose it with ``flowserve serve --batch-scheduler my-scheduler``."""
    register("my-scheduler", MyScheduler)
