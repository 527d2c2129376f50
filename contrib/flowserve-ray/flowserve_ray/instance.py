"""The server's handle on an engine actor (``RayInstance``), and where its actor is placed.

``run`` creates the actor (on its own, or in bundle 0 of the placement group of a
tensor-parallel gang, whose ranks 1 … N-1 it starts as actors on the other bundles),
waits for ``start``, then reads the actor's ``events`` stream until
the actor ends. An actor that dies (its process killed, its node lost) ends the stream with
a ``RayActorError``; one that sends nothing, not even a heartbeat, for
``step_timeout_seconds`` is killed. Either way its tasks fail with ``instance_failed`` (the
job scheduler may retry them elsewhere) and the scaler starts a replacement, exactly as for
a local instance process.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import msgspec

from flowserve_core.errors import EngineDeadError
from flowserve_core.types import DeploymentSpec, InstanceInfo, InstanceState, Task
from flowserve_instance_runtime import InstanceBase
from flowserve_ray.cluster import RayOptions
from flowserve_ray.protocol import ActorSetup, decode_batch, decode_ready, encode

log = logging.getLogger(__name__)


class RayInstance(InstanceBase):
    """An engine instance running as a Ray actor (see the module docstring).

    ``weights`` is the model's image in the object store (``SharedWeights``) or None;
    ``pool`` an ``ActorPool`` of pre-warmed actors to take one from (start path
    ``prewarmed``/``prewarmed+object-store``), or None.
    ``start_seconds`` counts from the scaler's decision to a ready engine.
    """

    def __init__(self, spec: DeploymentSpec, info: InstanceInfo, options: RayOptions, *,
                 weights: Any = None, log_level: str = "warning", pool: Any = None):
        super().__init__(info)
        self.spec, self.options, self.weights, self.log_level = spec, options, weights, log_level
        self.pool = pool
        self.actor: Any = None
        self.placement_group: Any = None
        self.node_id = ""
        self._created = time.monotonic()

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        import ray
        from ray.exceptions import RayActorError

        error: str | None = "the actor stopped"
        try:
            with anyio.fail_after(self.options.start_timeout):
                pooled = self.pool.take() if self.pool is not None and self.spec.tensor_parallel == 1 else None
                if pooled is not None:
                    self.actor = pooled
                else:
                    await self._create_actor()
                args: list[Any] = [encode(ActorSetup(spec=self.spec, info=self.info, log_level=self.log_level))]
                if self.weights is not None:
                    args += [[self.weights.ref], self.weights.index]
                ready = decode_ready(await self.actor.start.remote(*args, placement_group=self.placement_group))
            self.info.pid, self.node_id = ready.pid, ready.node_id
            self.info.start_path = ready.start_path if pooled is None else \
                {"loaded": "prewarmed"}.get(ready.start_path, f"prewarmed+{ready.start_path}")
            self.info.start_seconds = time.monotonic() - self._created
            if ready.note:
                log.info("instance %s started %s: %s", self.info.id, ready.start_path, ready.note,
                         extra={"instance": self.info.id, "start_path": ready.start_path})
            if not self.mark_ready():
                return  # stopped while warming
            task_status.started()
            finished = self.actor.run.remote()
            stream = self.actor.events.options(num_returns="streaming").remote()
            while True:
                with anyio.move_on_after(self.spec.step_timeout_seconds) as silent:
                    try:
                        ref = await stream.__anext__()
                    except StopAsyncIteration:
                        break
                    batch = decode_batch(await ref)
                if silent.cancelled_caught:
                    error = (f"the actor sent nothing for {self.spec.step_timeout_seconds:g} s "
                             f"(step_timeout_seconds): it is frozen or hung, so it was killed")
                    log.error("instance %s: %s", self.info.id, error, extra={"instance": self.info.id})
                    return
                self.stats = batch.stats
                self.dispatch(batch.events)
            with anyio.move_on_after(5):
                reason = await finished
                error = None if reason == "stopped" else f"the engine ended: {reason}"
        except RayActorError as exc:
            error = f"the Ray actor died: {_first_line(exc)}"
            log.error("instance %s: %s", self.info.id, error, extra={"instance": self.info.id})
        except Exception as exc:
            error = f"{type(exc).__name__}: {_first_line(exc)}"
            log.error("instance %s failed: %s", self.info.id, error, extra={"instance": self.info.id},
                      exc_info=not isinstance(exc, (TimeoutError, ray.exceptions.RayError)))
        finally:
            self.fail_all(f"instance {self.info.id} is gone: {error or 'stopped'}")
            self.set_state(InstanceState.GONE, error=error)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._release)

    async def _create_actor(self) -> None:
        """Reserve the gang's placement group (tensor parallelism) and create the actor."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from flowserve_ray.actor import EngineActor

        bundle = self.options.rank_resources(self.spec)
        options: dict[str, Any] = dict(
            name=f"flowserve-{self.spec.name or 'model'}-{self.info.id}", namespace=self.options.ray_namespace,
            max_restarts=0, max_concurrency=64, num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0))
        if self.spec.tensor_parallel > 1:
            # One bundle per rank: rank 0 is this actor (bundle 0); it creates the other
            # ranks as RankActors on bundles 1 … N-1 (see ranks.py).
            self.placement_group = ray.util.placement_group(
                [dict(bundle) for _ in range(self.spec.tensor_parallel)],
                strategy=self.options.placement_strategy, name=f"flowserve-{self.info.id}")
            await self.placement_group.ready()
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.placement_group, placement_group_bundle_index=0)
        self.actor = ray.remote(EngineActor).options(**options).remote()

    def _release(self) -> None:
        """Kill the actor and free its placement group (blocking; a thread runs it)."""
        import ray

        if self.actor is not None:
            try:
                ray.kill(self.actor, no_restart=True)
            except Exception:  # already gone
                pass
        if self.placement_group is not None:
            try:
                ray.util.remove_placement_group(self.placement_group)
            except Exception:
                pass

    async def send_task(self, task: Task) -> None:
        try:
            await self.actor.submit.remote(msgspec.msgpack.encode(task))
        except Exception as exc:  # the actor died, or its engine did (EngineDeadError inside)
            raise EngineDeadError(f"instance {self.info.id} cannot take tasks: {_first_line(exc)}") from None

    async def abort_task(self, task_id: str) -> None:
        if self.actor is None or self.info.state is InstanceState.GONE:
            return
        try:
            await self.actor.abort.remote(task_id)
        except Exception:
            pass  # the actor is gone; nothing runs to abort

    async def shutdown(self) -> None:
        if self.actor is None:
            return  # still being created: ``run`` ends when it sees the state
        try:
            with anyio.move_on_after(10):
                await self.actor.shutdown.remote()
        except Exception:
            pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
