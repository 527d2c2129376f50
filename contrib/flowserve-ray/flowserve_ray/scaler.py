"""Scaler ``ray``: engine instances as Ray actors, autoscaled by the shared policy.

Keeps the deployment's instances at their target like every ``TargetScaler`` (replacing
the ones whose actor dies), makes each instance a ``RayInstance``, and moves the target
with the same ``Autoscaler`` as the ``prewarm`` scaler (flowserve-instance-runtime's
``policy``: imported, not copied): demand over ``target_concurrency``, faster on a TTFT SLO breach,
scale-down after ``scale_down_delay``, to zero after ``scale_to_zero_after``.

Options (``--option KEY=VALUE``): those of ``cluster.RayOptions`` (``ray_address``,
``ray_namespace``, ``num_cpus``, ``num_gpus``, ``placement_strategy``,
``weights_via_object_store``, ``start_timeout``, ``pool_size``, ``autoscale``,
``scale_interval``) and the
``ScalingPolicy`` settings ``target_concurrency``, ``slo_scale_factor``,
``scale_up_cooldown``, ``scale_down_delay``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import anyio

from flowserve_core.interfaces import PluginLookup
from flowserve_core.types import DeploymentSpec, InstanceInfo, RequestOutput, TaskRole
from flowserve_instance_runtime import Autoscaler, ScalingPolicy, TargetScaler, TtftWindow, autoscale
from flowserve_ray.cluster import connect, read_options
from flowserve_ray.instance import RayInstance
from flowserve_ray.pool import ActorPool
from flowserve_ray.weights import SharedWeights, publish_weights, why_not_shared

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment

log = logging.getLogger(__name__)


class RayScaler(TargetScaler):
    """Runs a deployment's instances as Ray actors (see the module docstring)."""

    def __init__(self, spec: DeploymentSpec, plugins: PluginLookup):
        super().__init__(spec)
        self.plugins = plugins  # the server's manager: the model's architecture, for the shared image
        self.options = read_options(spec)
        self.policy = ScalingPolicy.from_spec(spec)
        self.autoscaler = Autoscaler(self.policy, now=time.monotonic())
        self.ttfts = TtftWindow()
        self.weights: SharedWeights | None = None
        self.pool = ActorPool(spec, self.options) if self.options.pool_size else None
        self.resources: dict[str, Any] = {}

    async def run(self, deployment: Deployment) -> None:
        self.resources = await anyio.to_thread.run_sync(
            connect, self.options.ray_address, self.options.ray_namespace)
        log.info("deployment %s runs on Ray (cluster resources: %s)", self.spec.name, self.resources,
                 extra={"deployment": self.spec.name})
        await self._publish_weights()
        try:
            async with anyio.create_task_group() as tg:
                if self.options.autoscale:
                    tg.start_soon(self._autoscale, deployment)
                if self.pool is not None:
                    tg.start_soon(self.pool.run)
                await super().run(deployment)
                tg.cancel_scope.cancel()
        finally:
            self.weights = None  # the last reference: Ray frees the image

    async def _publish_weights(self) -> None:
        if not self.options.weights_via_object_store:
            return
        why_not = why_not_shared(self.spec)
        if not why_not:
            try:
                self.weights = await anyio.to_thread.run_sync(publish_weights, self.spec, self.plugins)
                return
            except Exception as exc:
                why_not = f"{type(exc).__name__}: {exc}"
        log.info("weights of %s are not shared through the object store (%s); every actor loads "
                 "them itself", self.spec.name, why_not, extra={"deployment": self.spec.name})

    def make_instance(self, deployment: Deployment, role: TaskRole) -> RayInstance:
        info = InstanceInfo(deployment=self.spec.name, role=role)
        return RayInstance(self.spec, info, self.options, weights=self.weights, pool=self.pool,
                           log_level=os.environ.get("FLOWSERVE_LOG_LEVEL", "warning"))

    # ------------------------------------------------------------------ autoscaling

    def observe(self, output: RequestOutput) -> None:
        """Note a finished request's TTFT (the SLO check reads the last minute of them)."""
        self.ttfts.observe(output)

    async def _autoscale(self, deployment: Deployment) -> None:
        """Every scale interval: sample the load, ask the shared policy, move the target."""
        await autoscale(self, deployment, self.options.scale_interval, "Ray actors")
