"""Pre-warmed idle engine actors: the prewarm idea on Ray.

A fresh actor costs a new worker process, then importing torch, the executor and the plugins
before any weight is touched. The pool keeps ``pool_size`` actors that did all of that
(``EngineActor.warm``) and are waiting for a model; an instance takes one and only builds its
engine. Taken actors are replaced in the background. Pooled actors hold their resources
(``num_cpus``/``num_gpus``) while idle: that is the price of the faster start.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio

from flowserve_core.types import DeploymentSpec
from flowserve_ray.cluster import RayOptions

log = logging.getLogger(__name__)


class ActorPool:
    """Keeps ``options.pool_size`` warmed idle ``EngineActor``s for single-rank instances
    (filled once, then refilled as they are taken unless ``pool_refill`` is false)."""

    def __init__(self, spec: DeploymentSpec, options: RayOptions):
        self.spec, self.options = spec, options
        self.idle: list[Any] = []
        self._warming = 0
        self._filled = False
        self._wanted = anyio.Event()

    def take(self) -> Any | None:
        """A warmed idle actor, or None; the pool refills in the background."""
        actor = self.idle.pop(0) if self.idle else None
        self._wanted.set()
        return actor

    async def run(self) -> None:
        """Fill the pool and keep it full until cancelled; kill the idle actors at the end."""
        try:
            async with anyio.create_task_group() as tg:
                while True:
                    if not self._filled or self.options.pool_refill:
                        for _ in range(self.options.pool_size - len(self.idle) - self._warming):
                            self._warming += 1
                            tg.start_soon(self._add)
                    self._filled = True
                    self._wanted = anyio.Event()
                    await self._wanted.wait()
        finally:
            with anyio.CancelScope(shield=True):
                idle, self.idle = self.idle, []
                await anyio.to_thread.run_sync(_kill_all, idle)

    async def _add(self) -> None:
        import ray

        from flowserve_ray.actor import EngineActor

        bundle = self.options.rank_resources(self.spec)
        # Any: Ray types an actor's methods as the plain methods, without their ``.remote``
        actor: Any = ray.remote(EngineActor).options(
            namespace=self.options.ray_namespace, max_restarts=0, max_concurrency=64,
            num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0)).remote()
        try:
            await actor.warm.remote([f"{self.spec.executor}@{self.spec.device}"])
        except Exception as exc:
            log.warning("a pre-warmed Ray actor failed to warm: %s", exc)
            await anyio.to_thread.run_sync(_kill_all, [actor])
            await anyio.sleep(1.0)  # do not spin on a broken cluster
        else:
            self.idle.append(actor)
        finally:
            self._warming -= 1
            self._wanted.set()


def _kill_all(actors: list[Any]) -> None:
    import ray

    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:
            pass
