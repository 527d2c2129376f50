"""FlowServe's colocated serving policies: batch scheduler ``continuous`` (continuous batching
with chunked prefill and preemption by recompute) and job scheduler ``colocated``
(least-loaded routing, retry when an instance dies before the first token)."""

from flowserve_colocated.router import ColocatedJobScheduler, InstanceDied, load_key
from flowserve_colocated.scheduler import ContinuousBatchScheduler
from flowserve_colocated.sequence import Sequence, SequenceStatus

__all__ = [
    "ColocatedJobScheduler", "ContinuousBatchScheduler", "InstanceDied", "Sequence", "SequenceStatus", "load_key",
]
