"""Hook implementation: scaler ``prewarm``, built on the instance runtime (its
``TargetScaler``, ``RemoteInstance`` and shared autoscaling policy). Imports nothing heavy."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import anyio

from flowserve_core import hookimpl
from flowserve_core.factories import Register, ScalerFactory
from flowserve_core.types import DeploymentSpec, InstanceInfo, RequestOutput, TaskRole
from flowserve_instance_runtime import (
    Autoscaler,
    RemoteInstance,
    ScalingPolicy,
    TargetScaler,
    TtftWindow,
    autoscale,
    spawn_instance_process,
)

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment

log = logging.getLogger(__name__)

START_PATHS = ("auto", "fork", "preload", "prewarm", "naive")


class PrewarmScaler(TargetScaler):
    """Starts instances the fastest way the deployment allows and autoscales them.

    Start paths (option ``start_path``, default ``auto`` = ``fork``):

    - ``fork``: fork the model's zygote (weights mapped once, shared copy-on-write); on CUDA
      or NPU the zygote holds the weights on the device and a pre-warmed process attaches
      them through IPC handles (``ipc``); where the executor can do neither (no ``preload``
      on its factory, tensor parallelism) it falls back to ``prewarm``;
    - ``preload``: a pre-warmed process that maps the model's DRAM image;
    - ``prewarm``: a pre-warmed process that loads the model the ordinary way;
    - ``naive``: a fresh process.

    Each instance reports the path it really took (``InstanceInfo.start_path``).

    Options: ``pool_size`` (pre-warmed processes kept idle, default 2), ``pool_refill``
    (default true), ``autoscale`` (default true), ``scale_interval`` (seconds between load
    samples, default 0.5), and the ``ScalingPolicy`` settings ``target_concurrency``,
    ``slo_scale_factor``, ``scale_up_cooldown``, ``scale_down_delay``. ``min_instances``,
    ``max_instances``, ``slo_ttft_seconds`` and ``scale_to_zero_after`` come from the spec.
    """

    def __init__(self, spec: DeploymentSpec):
        super().__init__(spec)
        options = spec.options
        self.start_path = str(options.get("start_path", "auto"))
        if self.start_path not in START_PATHS:
            raise ValueError(f"option start_path must be one of {', '.join(START_PATHS)}, "
                             f"got {self.start_path!r}")
        self.pool_size = int(options.get("pool_size", 2))
        self.pool_refill = _flag(options.get("pool_refill", True))
        self.autoscale = _flag(options.get("autoscale", True))
        self.interval = float(options.get("scale_interval", 0.5))
        self.policy = ScalingPolicy.from_spec(spec)
        self.autoscaler = Autoscaler(self.policy, now=time.monotonic())
        self.ttfts = TtftWindow()
        self.resources: Any = None

    @property
    def forking(self) -> bool:
        return self.start_path in ("auto", "fork")

    async def run(self, deployment: Deployment) -> None:
        from flowserve_prewarm_scaler.pool import shared_resources

        self.resources = shared_resources()
        self.resources.pool.refill = self.pool_refill
        self.resources.attach(self.pool_size if self.start_path != "naive" else 0,
                              [f"{self.spec.executor}@{self.spec.device}"], self.spec)
        try:
            async with anyio.create_task_group() as tg:
                if self.forking:  # pre-load the model now, while there may be no instance yet
                    tg.start_soon(self.resources.zygotes.get, self.spec)
                if self.autoscale:
                    tg.start_soon(self._autoscale, deployment)
                await super().run(deployment)
        finally:
            with anyio.CancelScope(shield=True):
                await self.resources.detach(self.spec)

    def make_instance(self, deployment: Deployment, role: TaskRole) -> RemoteInstance:
        info = InstanceInfo(deployment=self.spec.name, role=role)
        if self.start_path == "naive":
            process, sock = spawn_instance_process()
            info.start_path = "naive"
            return RemoteInstance(self.spec, info, sock, process)

        async def launch() -> tuple[Any, Any, str]:
            if self.forking:
                zygote = await self.resources.zygotes.get(self.spec)
                if zygote is not None and not zygote.handles:
                    process, sock = await zygote.fork()
                    return process, sock, "forked"
                if zygote is not None:  # a device: attach the zygote's weights by IPC
                    instance.attach = zygote.handles
            taken = self.resources.pool.take()
            if taken is None:  # no pool: a fresh process that warms itself
                process, sock = spawn_instance_process(warm=[f"{self.spec.executor}@{self.spec.device}"])
                return process, sock, "naive"
            return taken

        instance = RemoteInstance(self.spec, info, preload=self.start_path == "preload", launcher=launch)
        return instance

    # ------------------------------------------------------------------ autoscaling

    def observe(self, output: RequestOutput) -> None:
        """Note a finished request's TTFT (the SLO check reads the last minute of them)."""
        self.ttfts.observe(output)

    async def _autoscale(self, deployment: Deployment) -> None:
        """Every scale interval: sample the load, ask the shared policy, move the target."""
        await autoscale(self, deployment, self.interval, "instances")


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off")
    return bool(value)


@hookimpl
def flowserve_register_scalers(register: Register[ScalerFactory]) -> None:
    register("prewarm", PrewarmScaler)
