"""Fast-start steps run inside instance and zygote processes, through the executor
factory's optional Protocols (``flowserve_core.interfaces``): ``FastStartExecutorFactory``
(``prewarm(device)``, ``preload(spec)``) and ``DeviceSharingExecutorFactory`` (``share(spec)``,
``attach(spec, handles)``). The ``spmd`` executor implements both (see
``flowserve_spmd_executor.preload``), ``llamacpp`` the first. Each returns why it could not,
rather than raising: the instance then starts the ordinary way and says why.

Each step takes the plugin manager its process built (the process's entry point, never a
process-global one), in which it looks the executor up by name.
"""

from __future__ import annotations

import logging
from typing import Any

from flowserve_core.interfaces import DeviceSharingExecutorFactory, FastStartExecutorFactory, ReportsWeightsPath
from flowserve_core.plugins import PluginManager
from flowserve_core.types import DeploymentSpec

log = logging.getLogger(__name__)


def _executor_factory(pm: PluginManager, name: str) -> Any:
    return pm.get("executor", name).factory


def warm_executors(pm: PluginManager, names: list[str]) -> list[str]:
    """Run the ``prewarm(device)`` of each ``executor@device`` whose factory in ``pm`` has
    one; the ones that warmed. A failure is logged, not fatal: the process is still usable."""
    warmed = []
    for item in filter(None, names):
        name, _, device = item.partition("@")
        try:
            factory = _executor_factory(pm, name)
            if isinstance(factory, FastStartExecutorFactory):
                factory.prewarm(device or "auto")
                warmed.append(item)
        except Exception:
            log.warning("could not pre-warm executor %s", item, exc_info=True)
    return warmed


def preload_model(pm: PluginManager, spec: DeploymentSpec) -> str:
    """Call the executor factory's ``preload(spec)`` in this process; '' if it did, else why not."""
    factory = _executor_factory(pm, spec.executor)
    if not isinstance(factory, FastStartExecutorFactory):
        return f"executor {spec.executor!r} offers no preload"
    try:
        factory.preload(spec)
    except Exception as exc:
        return f"preload failed ({type(exc).__name__}: {exc})"
    return ""


def share_weights(pm: PluginManager, spec: DeploymentSpec, why_not_preload: str) -> tuple[bytes, str]:
    """Where ``preload`` cannot (a device), hold the model here and return its IPC handles
    (the executor factory's ``share``); ``(b"", why not)`` when that fails too."""
    factory = _executor_factory(pm, spec.executor)
    if not isinstance(factory, DeviceSharingExecutorFactory):
        return b"", why_not_preload
    try:
        return factory.share(spec), ""
    except Exception as exc:
        return b"", f"{why_not_preload}; sharing device weights failed ({type(exc).__name__}: {exc})"


def attach_weights(pm: PluginManager, spec: DeploymentSpec, handles: bytes) -> str:
    """Attach a zygote's device weights (the factory's ``attach``); '' if done, else why not."""
    factory = _executor_factory(pm, spec.executor)
    if not isinstance(factory, DeviceSharingExecutorFactory):
        return f"executor {spec.executor!r} offers no attach"
    try:
        factory.attach(spec, handles)
    except Exception as exc:
        return f"attaching shared device weights failed ({type(exc).__name__}: {exc})"
    return ""


def weights_path(executor: object) -> str | None:
    """How the executor got its weights, if it says (``ReportsWeightsPath``)."""
    return executor.weights_path if isinstance(executor, ReportsWeightsPath) else None
