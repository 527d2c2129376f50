"""Built-in plugin: engine instances inside the server process (scaler ``inproc``).

For tests, plugin authors and small setups: no worker process, the executor computes in a
thread. Production scalers run each instance in its own process (``remote.py``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio

from flowserve_core.engine import Engine, build_engine
from flowserve_core.hookspecs import hookimpl
from flowserve_core.instance import InstanceBase
from flowserve_core.types import DeploymentSpec, InstanceInfo, InstanceState, Task, TaskRole, TokenEvent

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment
    from flowserve_core.plugins import PluginManager


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
                self.set_state(InstanceState.READY)
                task_status.started()
                await self.engine.run()
        finally:
            dead = self.engine.dead if self.engine else "instance failed to start"
            self.fail_all(f"instance {self.info.id} is gone: {dead or 'stopped'}")
            self.set_state(InstanceState.GONE, error=dead)

    async def _on_events(self, events: list[TokenEvent]) -> None:
        self.stats = self.engine.stats
        self.dispatch(events)

    async def _send_task(self, task: Task) -> None:
        self.engine.submit(task)

    async def _abort_task(self, task_id: str) -> None:
        if self.engine and not self.engine.dead:
            self.engine.abort(task_id)

    async def _shutdown(self) -> None:
        self._scope.cancel()


class InProcessScaler:
    """Keeps the deployment's instance count (``deployment.role_targets()``) in this process."""

    def __init__(self, spec: DeploymentSpec):
        self.spec = spec
        self.target: int | None = None
        self._changed = anyio.Event()

    def set_target(self, instances: int) -> None:
        self.target = instances
        self._changed.set()

    def on_demand(self, role: TaskRole) -> None:
        if self.target == 0:
            self.set_target(1)

    async def run(self, deployment: Deployment) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                roles = deployment.role_targets(self.target)
                running = [i for i in deployment.pool.instances.values()
                           if i.info.state is not InstanceState.DRAINING]
                for role in roles[len(running):]:
                    instance = LocalInstance(self.spec, deployment.pm,
                                             InstanceInfo(deployment=self.spec.name, role=role))
                    tg.start_soon(deployment.pool.run, instance)
                for instance in running[len(roles):]:
                    tg.start_soon(instance.stop)
                self._changed = anyio.Event()
                await self._changed.wait()


@hookimpl
def flowserve_register_scalers(register: Any) -> None:
    register("inproc", InProcessScaler)
