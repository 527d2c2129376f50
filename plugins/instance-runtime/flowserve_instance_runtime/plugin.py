"""Hook implementation: scaler ``static``. Imports nothing heavy."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowserve_core import hookimpl
from flowserve_core.factories import Register, ScalerFactory
from flowserve_core.types import InstanceInfo, TaskRole
from flowserve_instance_runtime.remote import RemoteInstance, spawn_instance_process
from flowserve_instance_runtime.target import TargetScaler

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment


class StaticScaler(TargetScaler):
    """Keeps ``min_instances`` (or the per-role counts) instance processes running, each
    started fresh (``python -m flowserve_instance_runtime.worker``), and replaces any that die."""

    def make_instance(self, deployment: Deployment, role: TaskRole) -> RemoteInstance:
        process, sock = spawn_instance_process()
        info = InstanceInfo(deployment=self.spec.name, role=role, start_path="naive")
        return RemoteInstance(self.spec, info, sock, process)


@hookimpl
def flowserve_register_scalers(register: Register[ScalerFactory]) -> None:
    register("static", StaticScaler)
