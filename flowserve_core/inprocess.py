"""Built-in plugin: engine instances inside the server process (scaler ``inproc``).

``TargetScaler`` is also the base of process-based scalers, which override ``make_instance``.

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
                if not self.mark_ready():
                    return  # stopped while warming (e.g. scaled down)
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


class TargetScaler:
    """Keeps the deployment's instances at ``deployment.role_targets(target)``, replacing
    the ones that die, and starts none once the deployment is stopping. Subclasses say how an
    instance is made (``make_instance``)."""

    drain_timeout = 30.0

    def __init__(self, spec: DeploymentSpec):
        self.spec = spec
        self.target: int | None = None
        self.deployment: Deployment | None = None

    def set_target(self, instances: int) -> None:
        self.target = instances
        if self.deployment:
            self.deployment.pool.notify()

    def on_demand(self, role: TaskRole) -> None:
        if self.deployment and not self.deployment.role_targets(self.target):
            self.set_target(1)

    def make_instance(self, deployment: Deployment, role: TaskRole) -> Any:
        return LocalInstance(self.spec, deployment.pm, InstanceInfo(deployment=self.spec.name, role=role))

    async def run(self, deployment: Deployment) -> None:
        self.deployment = deployment
        async with anyio.create_task_group() as tg:
            while True:
                wanted = [] if deployment.stopping else deployment.role_targets(self.target)
                live = [i for i in deployment.pool.instances.values()
                        if i.info.state in (InstanceState.WARMING, InstanceState.READY)]
                for role in {*wanted, *(i.info.role for i in live)}:
                    have = [i for i in live if i.info.role is role]
                    for _ in range(wanted.count(role) - len(have)):
                        tg.start_soon(deployment.pool.run, self.make_instance(deployment, role))
                    for instance in have[wanted.count(role):]:
                        tg.start_soon(instance.stop, self.drain_timeout)
                await deployment.pool.wait_changed()


@hookimpl
def flowserve_register_scalers(register: Any) -> None:
    register("inproc", TargetScaler)
