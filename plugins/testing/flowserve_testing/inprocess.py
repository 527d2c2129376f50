"""Scaler ``inproc``: engine instances inside the server's own process (``LocalInstance``).

``InprocScaler`` is flowserve-instance-runtime's ``TargetScaler`` (instances kept at the
deployment's target) making ``LocalInstance``s. For tests, plugin authors and small setups:
no worker process, the executor computes in a thread, and the test can reach the engine
(``DeploymentRunner.engines()``). Production scalers run each instance in its own process
(flowserve-instance-runtime's ``RemoteInstance``). The kit's plugin imports this module only
when a deployment with scaler ``inproc`` is made.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio

from flowserve_core.engine import Engine, build_engine
from flowserve_core.plugins import PluginManager
from flowserve_core.types import DeploymentSpec, InstanceInfo, InstanceState, Task, TaskRole, TokenEvent
from flowserve_instance_runtime import InstanceBase, TargetScaler

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment


class LocalInstance(InstanceBase):
    """An engine instance running on the server's own event loop."""

    def __init__(self, spec: DeploymentSpec, pm: PluginManager, info: InstanceInfo):
        super().__init__(info)
        self.spec, self.pm = spec, pm
        self.engine: Engine | None = None
        self._scope = anyio.CancelScope()

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        started = time.monotonic()
        self.info.start_path = self.info.start_path or "in-process"
        try:
            with self._scope:
                self.engine = await build_engine(self.spec, self.pm, self._on_events)
                self.info.start_seconds = time.monotonic() - started
                if not self.mark_ready():
                    return  # stopped while warming (e.g. scaled down)
                task_status.started()
                await self.engine.run()
        finally:
            dead = self.engine.dead if self.engine else "instance failed to start"
            self.fail_all(f"instance {self.info.id} is gone: {dead or 'stopped'}")
            self.set_state(InstanceState.GONE, error=dead)

    async def _on_events(self, events: list[TokenEvent]) -> None:
        assert self.engine is not None  # it sends the events
        self.stats = self.engine.stats
        self.dispatch(events)

    async def send_task(self, task: Task) -> None:
        assert self.engine is not None  # tasks come once the instance is ready
        self.engine.submit(task)

    async def abort_task(self, task_id: str) -> None:
        if self.engine and not self.engine.dead:
            self.engine.abort(task_id)

    async def shutdown(self) -> None:
        self._scope.cancel()


class InprocScaler(TargetScaler):
    """Scaler ``inproc``: keeps the deployment's target of ``LocalInstance``s in this process."""

    def make_instance(self, deployment: Deployment, role: TaskRole) -> LocalInstance:
        return LocalInstance(self.spec, deployment.pm, InstanceInfo(deployment=self.spec.name, role=role))
