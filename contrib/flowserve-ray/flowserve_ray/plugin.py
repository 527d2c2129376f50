"""Hook implementations: scaler ``ray`` and KV transport ``ray``. Imports neither Ray nor torch:
the factories do, so ``flowserve --help`` stays light and Ray stays optional."""

from __future__ import annotations

from typing import Any

from flowserve_core import hookimpl
from flowserve_core.factories import KVTransportFactory, Register, ScalerFactory
from flowserve_core.interfaces import PluginLookup
from flowserve_core.types import DeploymentSpec


class RayScalerFactory:
    """Factory of scaler ``ray``: engine instances as Ray actors (see ``flowserve_ray.scaler``),
    with the manager that registered it (the model's architecture, for the shared weights)."""

    def __init__(self, plugins: PluginLookup):
        self.plugins = plugins

    def __call__(self, spec: DeploymentSpec) -> Any:
        from flowserve_ray.scaler import RayScaler

        return RayScaler(spec, self.plugins)


def build_ray_transport(spec: DeploymentSpec) -> Any:
    """Factory of KV transport ``ray``: KV bytes as Ray objects (see ``flowserve_ray.transport``)."""
    from flowserve_ray.transport import RayObjectTransport

    return RayObjectTransport(spec)


@hookimpl
def flowserve_register_scalers(register: Register[ScalerFactory], plugins: PluginLookup) -> None:
    register("ray", RayScalerFactory(plugins))


@hookimpl
def flowserve_register_kv_transports(register: Register[KVTransportFactory]) -> None:
    register("ray", build_ray_transport)


@hookimpl
def flowserve_serve_flags() -> list[str]:
    """``flowserve serve --scaler ray --ray-address auto|HOST:PORT`` (``ray://`` is refused: see ``cluster``)."""
    return ["ray_address"]
