"""Scaler ``ray``: engine instances as Ray actors, autoscaled by the shared policy.

Keeps the deployment's instances at their target like every ``TargetScaler`` (replacing
the ones whose actor dies), makes each instance a ``RayInstance``, and moves the target
with the same ``Autoscaler`` as the ``prewarm`` scaler (``flowserve_prewarm_scaler.policy``:
imported, not copied): demand over ``target_concurrency``, faster on a TTFT SLO breach,
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
import math
import os
import time
from collections import deque
from typing import Any

import anyio

from flowserve_core.inprocess import TargetScaler
from flowserve_core.types import DeploymentSpec, InstanceInfo, RequestOutput, TaskRole
from flowserve_prewarm_scaler.policy import Autoscaler, LoadSample, ScalingPolicy

from flowserve_ray.cluster import connect, read_options
from flowserve_ray.instance import RayInstance
from flowserve_ray.pool import ActorPool
from flowserve_ray.weights import SharedWeights, publish_weights, why_not_shared

log = logging.getLogger(__name__)


class RayScaler(TargetScaler):
    """Runs a deployment's instances as Ray actors (see the module docstring)."""

    def __init__(self, spec: DeploymentSpec):
        super().__init__(spec)
        self.options = read_options(spec)
        defaults = ScalingPolicy()
        self.policy = ScalingPolicy(
            min_instances=spec.min_instances, max_instances=spec.max_instances,
            slo_ttft_seconds=spec.slo_ttft_seconds, scale_to_zero_after=spec.scale_to_zero_after,
            **{name: float(spec.options.get(name, getattr(defaults, name))) for name in (
                "target_concurrency", "slo_scale_factor", "scale_up_cooldown", "scale_down_delay")})
        self.autoscaler = Autoscaler(self.policy, now=time.monotonic())
        self.ttfts: deque[tuple[float, float]] = deque(maxlen=1024)
        self.weights: SharedWeights | None = None
        self.pool = ActorPool(spec, self.options) if self.options.pool_size else None
        self.resources: dict[str, Any] = {}

    async def run(self, deployment: Any) -> None:
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
                self.weights = await anyio.to_thread.run_sync(publish_weights, self.spec)
                return
            except Exception as exc:
                why_not = f"{type(exc).__name__}: {exc}"
        log.info("weights of %s are not shared through the object store (%s); every actor loads "
                 "them itself", self.spec.name, why_not, extra={"deployment": self.spec.name})

    def make_instance(self, deployment: Any, role: TaskRole) -> RayInstance:
        info = InstanceInfo(deployment=self.spec.name, role=role)
        return RayInstance(self.spec, info, self.options, weights=self.weights, pool=self.pool,
                           log_level=os.environ.get("FLOWSERVE_LOG_LEVEL", "warning"))

    # ------------------------------------------------------------------ autoscaling

    def observe_ray_ttft(self, output: RequestOutput) -> None:
        """Note a finished request's TTFT (the SLO check reads the last minute of them)."""
        ttft = output.metrics.ttft if output.metrics else None
        if ttft is not None:
            self.ttfts.append((time.monotonic(), ttft))

    def ttft_p90(self, now: float, window: float = 60.0) -> float | None:
        recent = sorted(t for at, t in self.ttfts if now - at <= window)
        return recent[min(len(recent) - 1, math.ceil(0.9 * len(recent)) - 1)] if recent else None

    async def _autoscale(self, deployment: Any) -> None:
        """Every ``scale_interval`` s: sample the load, ask the policy, move the target."""
        while not deployment.stopping:
            await anyio.sleep(self.options.scale_interval)
            stats = deployment.stats()
            current = len(deployment.role_targets(self.target))
            now = time.monotonic()
            wanted = self.autoscaler.desired(LoadSample(
                now=now, running=stats.num_running, waiting=stats.num_waiting, instances=current,
                ttft_p90=self.ttft_p90(now)))
            if wanted != current and not deployment.stopping:
                log.info("scaling %s from %d to %d Ray actors (%d running, %d waiting)", self.spec.name,
                         current, wanted, stats.num_running, stats.num_waiting,
                         extra={"deployment": self.spec.name, "from": current, "to": wanted})
                self.set_target(wanted)
