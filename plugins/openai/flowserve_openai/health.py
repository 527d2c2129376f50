"""Whether each deployment can serve: starting, warming, ready, scaled to zero, or dead.

A deployment is **ready** when every role it runs instances of (colocated; or prefill and
decode under PD) has a ready instance.

A deployment is **dead** when its instances fail to *start*: the last one failed before it
became ready and none is warming to replace it, or two failed to start in a row without any
becoming ready (a crash loop: a model that cannot load, a device that is missing). An
instance that crashes after it was ready (killed, out of memory, a lost device) is not a
sign of that: the scaler replaces it, and new requests wait for the replacement (up to
their timeout) while the tasks that were running on it fail with its error.

Instances leave the pool when they end, so a watcher follows each pool's changes and keeps
the ``InstanceInfo`` of every instance it saw until it sees how that instance ended; each
ending is counted once, however long the ended instance stays in the pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from flowserve_core.types import InstanceInfo, InstanceState
from flowserve_openai.ops_protocol import DeploymentHealth

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment
    from flowserve_core.server import Server

#: Start failures in a row, without a ready instance between them, that make a crash loop.
CRASH_LOOP = 2


@dataclass
class _History:
    deployment: Deployment
    infos: dict[str, InstanceInfo] = field(default_factory=dict)
    last_state: dict[str, InstanceState] = field(default_factory=dict)
    #: instances seen ready (their crash is replaced, not a start failure)
    were_ready: set[str] = field(default_factory=set)
    #: instances whose end was counted, until they leave the pool (count each end once)
    ended: set[str] = field(default_factory=set)
    failures: int = 0
    last_error: str | None = None


class HealthMonitor:
    """Follows the instances of a server's deployments and judges their health."""

    def __init__(self, server: Server):
        self.server = server
        self._history: dict[str, _History] = {}

    def observe(self, deployment: Deployment) -> _History:
        """Take note of ``deployment``'s instances now; count those that failed to start."""
        history = self._history.get(deployment.name)
        if history is None or history.deployment is not deployment:
            history = self._history[deployment.name] = _History(deployment)
        in_pool = dict(deployment.pool.instances)
        history.ended &= in_pool.keys()
        for instance_id, instance in in_pool.items():
            if instance_id not in history.ended:
                history.infos.setdefault(instance_id, instance.info)
        for instance_id, info in list(history.infos.items()):
            state = info.state
            if state is InstanceState.READY and instance_id not in history.were_ready:
                history.failures, history.last_error = 0, None  # a start that worked ends the run
                history.were_ready.add(instance_id)
            if state is InstanceState.GONE:
                drained = history.last_state.get(instance_id) is InstanceState.DRAINING
                crashed_after_ready = instance_id in history.were_ready or info.start_seconds > 0
                if info.error and not drained and not crashed_after_ready:
                    history.failures += 1
                    history.last_error = info.error
                del history.infos[instance_id]
                history.last_state.pop(instance_id, None)
                history.were_ready.discard(instance_id)
                if instance_id in in_pool:
                    history.ended.add(instance_id)
            else:
                history.last_state[instance_id] = state
        return history

    def health(self, deployment: Deployment) -> DeploymentHealth:
        """The state of ``deployment`` as /health, /ready and the API see it."""
        if deployment.tokenizer is None or not deployment.ready.is_set():
            return DeploymentHealth(state="starting", instances=deployment.pool.by_state())
        history = self.observe(deployment)
        counts = deployment.pool.by_state()
        wanted = deployment.role_targets(deployment.scaler.target)
        # Ready when every role the deployment runs has a ready instance: under PD a prefill
        # instance alone cannot answer anything.
        ready_roles = {instance.info.role for instance in deployment.pool.ready()}
        if ready_roles and ready_roles >= set(wanted):
            return DeploymentHealth(state="ready", instances=counts)
        warming = counts[InstanceState.WARMING.value]
        if not warming and not wanted:
            # Scaled to zero by choice: the next request starts an instance, whatever the last
            # one's end looked like (a drain the watcher saw only once it was over looks like a death).
            return DeploymentHealth(state="scaled-to-zero", instances=counts)
        if history.failures and (not warming or history.failures >= CRASH_LOOP):
            return DeploymentHealth(state="dead", instances=counts, error=(
                f"{history.failures} instance(s) of {deployment.name!r} failed to start in a row and "
                f"none is ready; the last error: {history.last_error}"))
        return DeploymentHealth(state="warming", instances=counts)

    async def watch(self) -> None:
        """Follow every deployment's pool until cancelled (new deployments are picked up)."""
        watched: set[int] = set()
        async with anyio.create_task_group() as tg:
            while True:
                for deployment in list(self.server.deployments.values()):
                    if id(deployment) not in watched:
                        watched.add(id(deployment))
                        tg.start_soon(self._watch_one, deployment)
                await anyio.sleep(0.5)

    async def _watch_one(self, deployment: Deployment) -> None:
        while self.server.deployments.get(deployment.name) is deployment:
            self.observe(deployment)
            with anyio.move_on_after(1.0):
                await deployment.pool.wait_changed()
        history = self._history.get(deployment.name)
        if history is not None and history.deployment is deployment:  # removed: forget it
            del self._history[deployment.name]
