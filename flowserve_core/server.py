"""A server: its deployments by name, aliases, and the frontend that serves them."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import threading
from typing import Iterable

import anyio
from anyio.abc import TaskGroup, TaskStatus

from flowserve_core.config import ServerConfig, resolve_deployment
from flowserve_core.deployment import Deployment
from flowserve_core.errors import ComponentNotFoundError, ConfigError, UnknownModelError
from flowserve_core.plugins import KNOWN_PROVIDERS, PluginManager
from flowserve_core.types import DeploymentSpec

log = logging.getLogger(__name__)

#: Seconds ``remove_deployment`` waits for stopped instances to end before it returns.
STOP_WAIT = 30.0
#: Seconds after a removal before its memory is collected and handed back to the OS.
RELEASE_DELAY = 2.0


def release_memory() -> None:
    """Collect a removed deployment's cycles and hand the heap it freed back to the OS: glibc keeps
    freed memory in per-thread arenas (the tokenizer loads in a worker thread), so without
    ``malloc_trim`` the server's RSS would never come down."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)


#: The component kinds a deployment chooses by name (``DeploymentSpec`` fields of those names).
DEPLOYMENT_KINDS = ("tokenizer", "executor", "kv_cache", "batch_scheduler", "job_scheduler", "scaler")


def deployment_components(spec: DeploymentSpec) -> list[tuple[str, str]]:
    """The ``(kind, name)`` of every component ``spec`` chooses."""
    return [(kind, getattr(spec, kind)) for kind in DEPLOYMENT_KINDS]


def server_components(config: ServerConfig) -> list[tuple[str, str]]:
    """The ``(kind, name)`` of every component ``config`` chooses: its frontend and its deployments'."""
    return [("frontend", config.frontend), *(c for spec in config.deployments for c in deployment_components(spec))]


def require_components(pm: PluginManager, wanted: Iterable[tuple[str, str]]) -> None:
    """Raise one ``ComponentNotFoundError`` naming every ``(kind, name)`` of ``wanted`` that no
    installed plugin provides, with the one ``pip install`` line that provides them all (a user
    fixes a bare kernel in one step, not one missing piece per run)."""
    missing = list(dict.fromkeys((kind, name) for kind, name in wanted if name not in pm.components(kind)))
    if len(missing) == 1:
        pm.get(*missing[0])  # its own message: what is installed instead, what failed to load
    if missing:
        providers = {key: dist for dist, keys in KNOWN_PROVIDERS.items() for key in keys}
        named = [f"{kind.replace('_', ' ')} {name!r}" for kind, name in missing]
        install = sorted({providers[f"{kind}:{name}"] for kind, name in missing if f"{kind}:{name}" in providers})
        unknown = [f"{kind.replace('_', ' ')} {name!r}" for kind, name in missing if f"{kind}:{name}" not in providers]
        message = f"these components are not installed: {', '.join(named)}."
        if install:
            message += f" Install them with: pip install {' '.join(install)}"
        if unknown:
            message += f" (no FlowServe distribution provides {', '.join(unknown)}: check the spelling)"
        raise ComponentNotFoundError(message)


class Server:
    """The deployments of one ``flowserve serve``, added and removed while it runs; frontends
    look models up here. ``resolve`` follows ``aliases``; ``set_alias`` and ``remove_alias``
    switch them by replacing the dict in one assignment (a request sees the old or the new
    target), so a blue/green switch never drops a request."""

    def __init__(self, config: ServerConfig, pm: PluginManager):
        self.config = config
        self.pm = pm
        self.deployments: dict[str, Deployment] = {}
        self.aliases: dict[str, str] = dict(config.aliases)
        self.stopping = False
        self._task_group: TaskGroup | None = None

    def check_components(self, spec: DeploymentSpec) -> None:
        """Fail fast, before loading anything, if a named component is not installed."""
        require_components(self.pm, deployment_components(spec))

    def resolve(self, model: str | None) -> Deployment:
        """The deployment serving ``model`` (a name or alias; empty: the first deployment)."""
        if not model and self.deployments:
            return next(iter(self.deployments.values()))
        name = self.aliases.get(model or "", model)
        if name not in self.deployments:
            served = sorted([*self.deployments, *self.aliases])
            raise UnknownModelError(f"the model {model!r} does not exist; this server serves: "
                                    f"{', '.join(served) or 'no models'}")
        return self.deployments[name]

    def set_alias(self, alias: str, deployment: str) -> str | None:
        """Serve ``deployment`` under the name ``alias`` too (create or switch it); returns the
        deployment it named before. ``ConfigError`` if ``alias`` is a deployment's name,
        ``UnknownModelError`` if ``deployment`` does not exist."""
        if alias in self.deployments:
            raise ConfigError(f"{alias!r} is a deployment's name; an alias needs a name of its own")
        if deployment not in self.deployments:
            raise UnknownModelError(f"no deployment is named {deployment!r}; deployments: "
                                    f"{', '.join(sorted(self.deployments)) or 'none'}")
        previous = self.aliases.get(alias)
        # One assignment: every later request sees the old or the new target; running ones stay.
        self.aliases = {**self.aliases, alias: deployment}
        log.info("alias set", extra={"alias": alias, "deployment": deployment})
        return previous

    def remove_alias(self, alias: str) -> str:
        """Stop serving ``alias`` (its deployment stays); returns the deployment it named.
        ``UnknownModelError`` if there is no such alias."""
        if alias not in self.aliases:
            raise UnknownModelError(f"no alias is named {alias!r}; aliases: "
                                    f"{', '.join(sorted(self.aliases)) or 'none'}")
        previous = self.aliases[alias]
        self.aliases = {a: d for a, d in self.aliases.items() if a != alias}
        log.info("alias removed", extra={"alias": alias, "deployment": previous})
        return previous

    async def add_deployment(self, spec: DeploymentSpec) -> Deployment:
        """Start serving ``spec``; returns once its deployment runs (instances may warm)."""
        resolve_deployment(spec)
        if self.stopping:
            raise ConfigError("the server is shutting down; it takes no new deployment")
        if spec.name in self.deployments or spec.name in self.aliases:
            raise ConfigError(f"a deployment or alias named {spec.name!r} already exists")
        self.check_components(spec)
        if self._task_group is None:
            raise ConfigError("the server is not running: start Server.run before adding deployments")
        deployment = Deployment(spec, self.pm)
        self.deployments[spec.name] = deployment
        removed = ConfigError(f"deployment {spec.name!r} was removed while it was starting")
        try:
            await self._task_group.start(deployment.run)
        except BaseException as exc:
            if self.deployments.get(spec.name) is deployment:
                del self.deployments[spec.name]
            if deployment.stopping and isinstance(exc, Exception):
                raise removed from None
            raise
        if deployment.stopping:  # removed before its run began: it ends at once
            raise removed
        log.info("deployment started", extra={"deployment": spec.name, "model": spec.model})
        return deployment

    async def remove_deployment(self, name: str, drain_timeout: float | None = None) -> None:
        """Stop routing to ``name`` (and its aliases) at once, let its admitted requests finish
        for up to ``drain_timeout`` s, then stop its instances. ``UnknownModelError`` if none."""
        deployment = self.deployments.pop(name, None)
        if deployment is None:
            raise UnknownModelError(f"no deployment is named {name!r}; deployments: "
                                    f"{', '.join(sorted(self.deployments)) or 'none'}")
        self.aliases = {a: d for a, d in self.aliases.items() if d != name}
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        log.info("removing deployment", extra={"deployment": name, "in_flight": len(deployment.requests)})
        with anyio.move_on_after(timeout) as drain:
            while deployment.requests:  # admitted requests keep their instances until they end
                await anyio.sleep(0.05)
        await deployment.stop(max(0.0, drain.deadline - anyio.current_time()) if timeout else 0.0)
        with anyio.move_on_after(STOP_WAIT):  # until its instances have ended (processes reaped)
            while deployment.pool.instances:
                await deployment.pool.wait_changed()
        log.info("deployment removed", extra={"deployment": name})
        if not self.stopping:  # once the last references (health watchers, the caller) are gone
            release = threading.Timer(RELEASE_DELAY, release_memory)
            release.daemon = True
            release.start()

    async def run(self, *, task_status: TaskStatus[Server] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every configured deployment, then serve the frontend until it returns."""
        require_components(self.pm, server_components(self.config))
        frontend = self.pm.build("frontend", self.config.frontend, self.config)
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            for spec in self.config.deployments:
                await self.add_deployment(spec)
            task_status.started(self)
            try:
                await frontend.serve(self)
            finally:
                await self.shutdown()
                tg.cancel_scope.cancel()

    async def shutdown(self) -> None:
        """Drain every deployment (graceful shutdown), then stop them."""
        self.stopping = True
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for name in list(self.deployments):
                    tg.start_soon(self.remove_deployment, name)
