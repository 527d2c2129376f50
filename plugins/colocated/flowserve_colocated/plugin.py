"""Hook implementations: batch scheduler ``continuous``, job scheduler ``colocated`` and SLO
admission for deployments run by it or a subclass (pure Python and anyio; cheap to import)."""

from __future__ import annotations

from typing import Any

from flowserve_colocated.router import ColocatedJobScheduler
from flowserve_colocated.scheduler import ContinuousBatchScheduler
from flowserve_core import hookimpl


@hookimpl
def flowserve_register_batch_schedulers(register: Any) -> None:
    register("continuous", ContinuousBatchScheduler)


@hookimpl
def flowserve_register_job_schedulers(register: Any) -> None:
    register("colocated", ColocatedJobScheduler)


@hookimpl
def flowserve_admit_request(request: Any, deployment: Any) -> Any:
    """A deployment with SLOs refuses early what would miss them (its job scheduler's
    ``admission``: ``colocated``, and the PD schedulers built on it, each estimate their own)."""
    scheduler = getattr(deployment, "job_scheduler", None)
    if isinstance(scheduler, ColocatedJobScheduler):
        return scheduler.admission(request, deployment.pool)
    return None
