"""Built-in plugin: the scaler ``inproc``, and ``TargetScaler``, the base of scalers.

``TargetScaler`` keeps a deployment's instances at their target; process-based scalers
(``static``, ``prewarm``, ``ray``) subclass it and override ``make_instance``. By itself it
is the scaler ``inproc``: its instances run inside the server process, the executor
computing in a thread. That is for tests, plugin authors and small setups, so the instance
class (``LocalInstance``) lives in the plugin kit, ``flowserve_core.testing.inprocess``, and
is imported only when such an instance starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from flowserve_core.hookspecs import hookimpl
from flowserve_core.types import DeploymentSpec, InstanceInfo, InstanceState, TaskRole

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment


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
        """A new instance of ``role`` (not started yet); by default one in this process."""
        from flowserve_core.testing.inprocess import LocalInstance  # the kit's: see the module doc

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
