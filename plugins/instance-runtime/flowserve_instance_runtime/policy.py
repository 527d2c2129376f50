"""The autoscaling policy: how many instances a deployment should run, from its load.

Pure logic with the clock passed in, so it is tested without sleeping and shared by every
scaler that autoscales (``prewarm`` of flowserve-prewarm-scaler, ``ray`` of flowserve-ray):
a scaler keeps an ``Autoscaler`` and a ``TtftWindow`` and runs ``autoscale``.

- Demand is the requests running plus waiting; the wanted count is demand divided by
  ``target_concurrency`` per instance, rounded up.
- A TTFT SLO breach (p90 of recent requests over ``slo_ttft_seconds``) scales up faster:
  at least ``slo_scale_factor`` × the current count.
- Scale-up happens at once (after ``scale_up_cooldown``); scale-down only when the wanted
  count stayed lower for ``scale_down_delay`` seconds (the highest wish in that window is
  kept), so load that comes and goes does not flap.
- With ``scale_to_zero_after`` set, a deployment with no request for that long goes to zero;
  a request arriving at zero asks for one instance at once.
- Everything is clamped to ``[min_instances, max_instances]`` while there is demand.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Protocol

import anyio
import msgspec

from flowserve_core.types import DeploymentSpec

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment
    from flowserve_core.types import RequestOutput


class ScalingPolicy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Settings of the autoscaler (``--option`` keys of the same names override them)."""

    min_instances: int = 0
    max_instances: int = 8
    target_concurrency: float = 8.0
    slo_ttft_seconds: float | None = None
    slo_scale_factor: float = 2.0
    scale_up_cooldown: float = 1.0
    scale_down_delay: float = 30.0
    scale_to_zero_after: float | None = None

    def __post_init__(self) -> None:
        if self.target_concurrency <= 0:
            raise ValueError("target_concurrency must be > 0")
        if self.max_instances < self.min_instances:
            raise ValueError("max_instances must be >= min_instances")

    @classmethod
    def from_spec(cls, spec: DeploymentSpec) -> ScalingPolicy:
        """The policy of a deployment: its bounds and SLO, and the tuning keys of its options."""
        defaults = cls()
        max_instances = spec.max_instances
        assert max_instances is not None  # DeploymentSpec fills it in
        return cls(
            min_instances=spec.min_instances, max_instances=max_instances,
            slo_ttft_seconds=spec.slo_ttft_seconds, scale_to_zero_after=spec.scale_to_zero_after,
            **{name: float(spec.options.get(name, getattr(defaults, name))) for name in (
                "target_concurrency", "slo_scale_factor", "scale_up_cooldown", "scale_down_delay")})


class LoadSample(msgspec.Struct, kw_only=True):
    """What the scaler saw at one moment."""

    now: float
    running: int
    waiting: int
    instances: int
    ttft_p90: float | None = None


class Autoscaler:
    """Turns load samples into a wanted instance count, with cooldowns and hysteresis."""

    def __init__(self, policy: ScalingPolicy, now: float = 0.0):
        self.policy = policy
        self.last_request_time = now
        self.last_scale_up = -math.inf
        self._below_since: float | None = None
        self._highest_below = 0

    def desired(self, sample: LoadSample) -> int:
        """The instance count to run now (may equal ``sample.instances``)."""
        policy, current = self.policy, sample.instances
        demand = sample.running + sample.waiting
        if demand:
            self.last_request_time = sample.now
        elif policy.scale_to_zero_after is not None \
                and sample.now - self.last_request_time >= policy.scale_to_zero_after:
            self._below_since = None
            return 0
        wish = math.ceil(demand / policy.target_concurrency)
        if policy.slo_ttft_seconds is not None and sample.ttft_p90 is not None \
                and sample.ttft_p90 > policy.slo_ttft_seconds and current:
            wish = max(wish, math.ceil(current * policy.slo_scale_factor))
        wish = min(max(wish, policy.min_instances, 1 if demand else 0), policy.max_instances)
        if wish >= current:
            self._below_since = None
            if wish > current and current and sample.now - self.last_scale_up < policy.scale_up_cooldown:
                return current
            if wish > current:
                self.last_scale_up = sample.now
            return wish
        # Lower wishes must persist for the whole delay; then go to the highest of them.
        if self._below_since is None:
            self._below_since, self._highest_below = sample.now, wish
        self._highest_below = max(self._highest_below, wish)
        if sample.now - self._below_since < policy.scale_down_delay:
            return current
        target, self._below_since = self._highest_below, None
        return target


class TtftWindow:
    """Finished requests' times to first token, for the SLO check (the last minute's p90)."""

    def __init__(self, maxlen: int = 1024):
        self.samples: deque[tuple[float, float]] = deque(maxlen=maxlen)

    def observe(self, output: RequestOutput) -> None:
        """Note a finished request's TTFT (``RequestOutput``; none when it never produced one)."""
        ttft = output.metrics.ttft if output.metrics else None
        if ttft is not None:
            self.samples.append((time.monotonic(), ttft))

    def p90(self, now: float, window: float = 60.0) -> float | None:
        recent = sorted(t for at, t in self.samples if now - at <= window)
        return recent[min(len(recent) - 1, math.ceil(0.9 * len(recent)) - 1)] if recent else None


class AutoscaledScaler(Protocol):
    """What ``autoscale`` needs of a scaler: its policy state and its target (a
    ``TargetScaler`` with an ``Autoscaler`` and a ``TtftWindow`` fits)."""

    autoscaler: Autoscaler
    ttfts: TtftWindow

    @property
    def target(self) -> int | None: ...

    def set_target(self, instances: int) -> None: ...


async def autoscale(scaler: AutoscaledScaler, deployment: Deployment, interval: float,
                    unit: str = "instances") -> None:
    """The autoscaling loop every autoscaling scaler runs: every ``interval`` s, sample the
    deployment's load, ask ``scaler.autoscaler`` (an ``Autoscaler``) and move
    ``scaler.set_target``. ``scaler.ttfts`` is its ``TtftWindow``."""
    log = logging.getLogger(type(scaler).__module__)
    while not deployment.stopping:
        await anyio.sleep(interval)
        stats = deployment.stats()
        current = len(deployment.role_targets(scaler.target))
        now = time.monotonic()
        wanted = scaler.autoscaler.desired(LoadSample(
            now=now, running=stats.num_running, waiting=stats.num_waiting, instances=current,
            ttft_p90=scaler.ttfts.p90(now)))
        if wanted != current and not deployment.stopping:
            log.info("scaling %s from %d to %d %s (%d running, %d waiting)", deployment.name, current, wanted,
                     unit, stats.num_running, stats.num_waiting,
                     extra={"deployment": deployment.name, "from": current, "to": wanted})
            scaler.set_target(wanted)
