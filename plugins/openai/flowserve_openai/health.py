"""Whether each deployment can serve: starting, warming, ready, scaled to zero, or dead.

A deployment is **dead** when it has no ready instance and its instances keep failing:
the last one died (went away without being drained, with an error) and none is warming to
replace it, or two died in a row without any becoming ready (a crash loop). Instances
leave the pool when they end, so a watcher follows each pool's changes and keeps the
``InstanceInfo`` of every instance it saw until it sees how that instance ended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio

from flowserve_core.types import InstanceInfo, InstanceState
from flowserve_openai.ops_protocol import DeploymentHealth

#: Failures in a row, without a ready instance between them, that make a crash loop.
CRASH_LOOP = 2


@dataclass
class _History:
    deployment: Any
    infos: dict[str, InstanceInfo] = field(default_factory=dict)
    last_state: dict[str, InstanceState] = field(default_factory=dict)
    failures: int = 0
    last_error: str | None = None


class HealthMonitor:
    """Follows the instances of a server's deployments and judges their health."""

    def __init__(self, server: Any):
        self.server = server
        self._history: dict[str, _History] = {}

    def observe(self, deployment: Any) -> _History:
        """Take note of ``deployment``'s instances now; count those that died."""
        history = self._history.get(deployment.name)
        if history is None or history.deployment is not deployment:
            history = self._history[deployment.name] = _History(deployment)
        for instance_id, instance in list(deployment.pool.instances.items()):
            history.infos.setdefault(instance_id, instance.info)
        for instance_id, info in list(history.infos.items()):
            state = info.state
            if state is InstanceState.READY:
                history.failures, history.last_error = 0, None
            if state is InstanceState.GONE:
                drained = history.last_state.get(instance_id) is InstanceState.DRAINING
                if info.error and not drained:
                    history.failures += 1
                    history.last_error = info.error
                del history.infos[instance_id]
                history.last_state.pop(instance_id, None)
            else:
                history.last_state[instance_id] = state
        return history

    def health(self, deployment: Any) -> DeploymentHealth:
        """The state of ``deployment`` as /health, /ready and the API see it."""
        if deployment.tokenizer is None or not deployment.ready.is_set():
            return DeploymentHealth(state="starting", instances=deployment.pool.by_state())
        history = self.observe(deployment)
        counts = deployment.pool.by_state()
        if counts[InstanceState.READY.value]:
            return DeploymentHealth(state="ready", instances=counts)
        warming = counts[InstanceState.WARMING.value]
        wanted = deployment.role_targets(getattr(deployment.scaler, "target", None))
        if not warming and not wanted:
            # Scaled to zero by choice: the next request starts an instance, whatever the last
            # one's end looked like (a drain the watcher saw only once it was over looks like a death).
            return DeploymentHealth(state="scaled-to-zero", instances=counts)
        if history.failures and (not warming or history.failures >= CRASH_LOOP):
            return DeploymentHealth(state="dead", instances=counts, error=(
                f"{history.failures} instance(s) of {deployment.name!r} failed in a row and none is "
                f"ready; the last error: {history.last_error}"))
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

    async def _watch_one(self, deployment: Any) -> None:
        while self.server.deployments.get(deployment.name) is deployment:
            self.observe(deployment)
            with anyio.move_on_after(1.0):
                await deployment.pool.wait_changed()
        history = self._history.get(deployment.name)
        if history is not None and history.deployment is deployment:  # removed: forget it
            del self._history[deployment.name]
