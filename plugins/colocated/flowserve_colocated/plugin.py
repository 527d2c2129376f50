"""Hook implementations: batch scheduler ``continuous`` and job scheduler ``colocated`` (pure
Python and anyio; cheap to import). Its SLO admission is the job scheduler's own
``admission`` method, which the deployment calls (``interfaces.AdmissionControl``)."""

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
