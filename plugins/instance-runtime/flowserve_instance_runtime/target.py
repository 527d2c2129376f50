"""``TargetScaler``: the base of scalers, keeping a deployment's instances at their target.

Subclasses say how an instance is made (``make_instance``): ``static`` (this distribution)
and ``prewarm`` (flowserve-prewarm-scaler) start instance processes, ``ray`` (flowserve-ray)
Ray actors, and ``inproc`` (flowserve-testing) instances inside the server process. It lives
in the instance runtime that scalers build on, not in the kernel, which needs only the
``Scaler`` and ``Instance`` Protocols.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from flowserve_core.types import DeploymentSpec, InstanceState, TaskRole

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
        """A new instance of ``role`` (not started yet), run by ``run`` in the deployment's pool."""
        raise NotImplementedError(f"{type(self).__name__} must say how an instance is made (make_instance)")

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
