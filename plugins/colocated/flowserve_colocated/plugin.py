"""Hook implementations: batch scheduler ``continuous`` and job scheduler ``colocated`` (pure
Python and anyio; cheap to import). Its SLO admission is the job scheduler's own
``admission`` method, which the deployment calls (``interfaces.AdmissionControl``)."""

from __future__ import annotations

from flowserve_colocated.router import ColocatedJobScheduler
from flowserve_colocated.scheduler import ContinuousBatchScheduler
from flowserve_core import hookimpl
from flowserve_core.factories import BatchSchedulerFactory, JobSchedulerFactory, Register


@hookimpl
def flowserve_register_batch_schedulers(register: Register[BatchSchedulerFactory]) -> None:
    register("continuous", ContinuousBatchScheduler)


@hookimpl
def flowserve_register_job_schedulers(register: Register[JobSchedulerFactory]) -> None:
    register("colocated", ColocatedJobScheduler)
