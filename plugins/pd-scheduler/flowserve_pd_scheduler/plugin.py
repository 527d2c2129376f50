"""Hook implementations: job schedulers ``pd-disaggregated`` and ``pd-hybrid``, KV transports
``shm`` and ``torch-dist`` (pure Python; cheap to import). Their SLO admission
(``DisaggregatedJobScheduler.admission``) is called by the colocated plugin's admission hook,
as for every job scheduler built on ``ColocatedJobScheduler``."""

from __future__ import annotations

from flowserve_core import hookimpl
from flowserve_core.factories import JobSchedulerFactory, KVTransportFactory, Register
from flowserve_pd_scheduler.disaggregated import DisaggregatedJobScheduler
from flowserve_pd_scheduler.hybrid import HybridJobScheduler
from flowserve_pd_scheduler.shm import SharedMemoryTransport
from flowserve_pd_scheduler.torch_transport import TorchDistributedTransport


@hookimpl
def flowserve_register_job_schedulers(register: Register[JobSchedulerFactory]) -> None:
    register("pd-disaggregated", DisaggregatedJobScheduler)
    register("pd-hybrid", HybridJobScheduler)


@hookimpl
def flowserve_register_kv_transports(register: Register[KVTransportFactory]) -> None:
    register("shm", SharedMemoryTransport)
    register("torch-dist", TorchDistributedTransport)
