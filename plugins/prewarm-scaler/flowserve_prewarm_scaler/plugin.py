"""Hook implementations: scaler ``static``."""

from __future__ import annotations

from typing import Any

from flowserve_core import hookimpl
from flowserve_core.inprocess import TargetScaler
from flowserve_core.types import InstanceInfo, TaskRole

from flowserve_prewarm_scaler.worker import RemoteInstance, spawn_instance_process


class StaticScaler(TargetScaler):
    """Keeps ``min_instances`` (or the per-role counts) instance processes running, each
    started fresh (``python -m flowserve_prewarm_scaler.worker``), and replaces any that die."""

    def make_instance(self, deployment: Any, role: TaskRole) -> RemoteInstance:
        process, sock = spawn_instance_process()
        info = InstanceInfo(deployment=self.spec.name, role=role, start_path="naive")
        return RemoteInstance(self.spec, info, sock, process)


@hookimpl
def flowserve_register_scalers(register: Any) -> None:
    register("static", StaticScaler)
