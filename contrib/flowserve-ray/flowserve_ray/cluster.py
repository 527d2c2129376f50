"""Joining a Ray cluster, and the scaler's settings read from ``DeploymentSpec.options``.

``ray_address`` (option, else ``$RAY_ADDRESS``): ``auto`` joins the cluster running on this
machine (``ray start --head`` or a KubeRay head pod), ``HOST:PORT`` a given one; unset, a
process that is not yet connected starts a local Ray instance. ``ray://…`` (Ray Client) is
refused with a message: Ray Client cannot carry streaming actor calls (Ray 2.60 raises "Streaming
actor methods … are not currently supported when using Ray Client"), and every engine actor
streams its events that way, so the server must run on a node of the cluster. A process already connected (``ray.init`` done by the embedder or a test) keeps
its connection.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import msgspec

from flowserve_core.errors import ConfigError
from flowserve_core.types import DeploymentSpec

log = logging.getLogger(__name__)

NAMESPACE = "flowserve"
STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")


class RayOptions(msgspec.Struct, kw_only=True):
    """How the ``ray`` scaler places and starts instances (each an ``--option`` key)."""

    #: cluster to join (see the module docstring); "" = $RAY_ADDRESS, else a local instance
    ray_address: str = ""
    ray_namespace: str = NAMESPACE
    #: CPUs reserved per rank (an instance of tensor_parallel N reserves N bundles)
    num_cpus: float = 1.0
    #: GPUs per rank; default 1 on device cuda, else 0
    num_gpus: float | None = None
    #: placement strategy of a tensor-parallel gang's bundles
    placement_strategy: str = "STRICT_PACK"
    #: put the model's weights into the object store once and map them in every actor
    weights_via_object_store: bool = True
    #: seconds an actor may take from creation to a built engine
    start_timeout: float = 600.0
    #: pre-warmed idle actors kept ready (runtime imported, executor warmed; each holds
    #: ``num_cpus``); an instance takes one instead of starting a fresh worker process
    pool_size: int = 0
    #: replace pooled actors as instances take them
    pool_refill: bool = True
    autoscale: bool = True
    scale_interval: float = 0.5

    def rank_resources(self, spec: DeploymentSpec) -> dict[str, float]:
        """One rank's bundle: CPUs, and GPUs where the device wants them."""
        gpus = self.num_gpus if self.num_gpus is not None else (1.0 if spec.device.startswith("cuda") else 0.0)
        bundle = {"CPU": self.num_cpus}
        if gpus:
            bundle["GPU"] = gpus
        return bundle


def read_options(spec: DeploymentSpec) -> RayOptions:
    """The scaler's settings from ``spec.options`` (unknown keys belong to other plugins)."""
    fields = {name: spec.options[name] for name in RayOptions.__struct_fields__ if name in spec.options}
    try:
        options = msgspec.convert(fields, RayOptions, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"deployment {spec.name!r}: bad ray scaler option: {exc}") from None
    options.placement_strategy = options.placement_strategy.upper()
    if options.placement_strategy not in STRATEGIES:
        raise ConfigError(f"option placement_strategy must be one of {', '.join(STRATEGIES)}, "
                          f"got {options.placement_strategy!r}")
    if options.pool_size < 0:
        raise ConfigError(f"option pool_size must be >= 0, got {options.pool_size}")
    if options.num_cpus < 0:
        raise ConfigError(f"option num_cpus must be >= 0, got {options.num_cpus}")
    check_address(options.ray_address or os.environ.get("RAY_ADDRESS", ""))
    return options


def check_address(address: str) -> None:
    """Refuse a Ray Client address (see the module docstring) with what to do instead."""
    if address.startswith("ray://"):
        raise ConfigError(
            f"ray_address {address!r} goes through Ray Client, which cannot stream actor calls "
            f"(the engine actors stream their tokens); run `flowserve serve` on a node of the "
            f"cluster (a KubeRay head pod, or any node that ran `ray start`) with --ray-address auto, "
            f"or give the cluster's GCS address as HOST:PORT (port 6379 by default)")


def connect(address: str = "", namespace: str = NAMESPACE) -> dict[str, Any]:
    """Join (or start) the Ray cluster once per process; the cluster's resources. Blocks."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS", "")
        kwargs: dict[str, Any] = {"namespace": namespace, "ignore_reinit_error": True,
                                  "log_to_driver": True}
        # "local": a new local instance even if `ray start` left one running here
        kwargs["address"] = address or "local"
        if not address:
            kwargs["include_dashboard"] = False
        # Instances load the model themselves; nothing may reach for the network.
        kwargs["runtime_env"] = {"env_vars": {"HF_HUB_OFFLINE": "1",
                                              "FLOWSERVE_LOG_LEVEL": os.environ.get("FLOWSERVE_LOG_LEVEL", "warning")}}
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise ConfigError(f"could not join the Ray cluster at {address!r}: {exc} (start one with "
                              f"`ray start --head`, or leave ray_address unset for a local one)") from None
        log.info("joined Ray cluster %s", address or "(local)", extra={"ray_address": address or "local"})
    return ray.cluster_resources()
