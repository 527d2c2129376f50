"""The plugin manager: loads ``flowserve`` entry points, registers built-ins, resolves components.

One broken plugin cannot break the tool (each entry point loads in its own try/except) unless
``FLOWSERVE_STRICT_PLUGINS=1``. ``FLOWSERVE_LOAD_PLUGINS=a,b`` is an allow-list (set and empty:
none); ``blocked`` / ``FLOWSERVE_BLOCK_PLUGINS=a,b`` / ``--plugin no:NAME`` skip plugins. Worker
processes read the same variables, so they load the same plugins as the server."""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import os
import traceback
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable

import msgspec
import pluggy

from flowserve_core import hookspecs
from flowserve_core.errors import ComponentNotFoundError, PluginError

if TYPE_CHECKING:
    from flowserve_core.factories import KVTransports
    from flowserve_core.interfaces import KVTransport
    from flowserve_core.types import DeploymentSpec

ENTRY_POINT_GROUP = "flowserve"

#: kind → the registration hook that fills it
KINDS: dict[str, str] = {
    "tokenizer": "flowserve_register_tokenizers",
    "executor": "flowserve_register_executors",
    "kv_cache": "flowserve_register_kv_cache_managers",
    "batch_scheduler": "flowserve_register_batch_schedulers",
    "job_scheduler": "flowserve_register_job_schedulers",
    "scaler": "flowserve_register_scalers",
    "kv_transport": "flowserve_register_kv_transports",
    "frontend": "flowserve_register_frontends",
    "structured_output": "flowserve_register_structured_output_backends",
    "tool_parser": "flowserve_register_tool_parsers",
}

#: Our own distributions and the components (``kind:name``) they provide, so that a missing
#: component names the ``pip install`` that fixes it.
KNOWN_PROVIDERS: dict[str, tuple[str, ...]] = {
    "flowserve-hf-tokenizer": ("tokenizer:hf",),
    "flowserve-spmd-executor": ("executor:spmd",),
    "flowserve-paged-kv": ("kv_cache:paged",),
    "flowserve-colocated": ("batch_scheduler:continuous", "job_scheduler:colocated"),
    "flowserve-pd-scheduler": ("job_scheduler:pd-disaggregated", "job_scheduler:pd-hybrid",
                               "kv_transport:shm", "kv_transport:torch-dist"),
    "flowserve-instance-runtime": ("scaler:static",),
    "flowserve-prewarm-scaler": ("scaler:prewarm",),
    "flowserve-ray": ("scaler:ray", "kv_transport:ray"),
    "flowserve-testing": ("scaler:inproc",),
    "flowserve-openai": ("frontend:openai",),
    "flowserve-xgrammar": ("structured_output:xgrammar",),
    "flowserve-tool-parsers": ("tool_parser:hermes", "tool_parser:llama3_json", "tool_parser:mistral"),
}

#: Modules registered in every manager, as ordinary plugins: the kernel's OpenTelemetry metrics
#: are an observer of finished requests.
BUILTIN_PLUGINS = ("flowserve_core.telemetry",)


class Component(msgspec.Struct, frozen=True):
    """A named component some plugin registered, with the distribution that provides it."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    distribution: str


class PluginRecord(msgspec.Struct):
    """One loaded (or failed) plugin, as ``flowserve plugins`` lists it."""

    name: str
    distribution: str
    version: str
    error: str | None = None


class PluginManager:
    """FlowServe's pluggy manager plus the by-name component registry built from it."""

    def __init__(self, *, load_entrypoints: bool = True, blocked: Iterable[str] = (),
                 allow: Iterable[str] | None = None, strict: bool | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.strict = os.environ.get("FLOWSERVE_STRICT_PLUGINS") == "1" if strict is None else strict
        allow = _env_list("FLOWSERVE_LOAD_PLUGINS") if allow is None else allow
        self.allow = None if allow is None else set(allow)
        self.blocked = set(blocked) | set(_env_list("FLOWSERVE_BLOCK_PLUGINS") or ())
        self.records: list[PluginRecord] = []
        self._components: dict[str, dict[str, Component]] = {}
        for module_name in BUILTIN_PLUGINS:
            self.register(importlib.import_module(module_name), name=module_name, distribution="flowserve-core")
        if load_entrypoints:
            self.load_entrypoints()

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def load_entrypoints(self) -> None:
        """Load every ``flowserve`` entry point that the allow/block lists let through."""
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist, version = (ep.dist.name, ep.dist.version) if ep.dist else ("?", "?")
            if ep.name in self.blocked or dist in self.blocked or self.pm.get_plugin(ep.name):
                continue
            if self.allow is not None and ep.name not in self.allow and dist not in self.allow:
                continue
            try:
                self.register(ep.load(), name=ep.name, distribution=dist, version=version)
            except Exception as exc:  # one broken plugin must not break the tool
                if self.strict:
                    raise PluginError(f"plugin {ep.name!r} ({dist}) failed to load: {exc}") from exc
                error = traceback.format_exception_only(exc)[-1].strip()
                self.records.append(PluginRecord(ep.name, dist, version, error=error))

    def register(self, plugin: object, name: str | None = None, distribution: str = "(local)",
                 version: str = "") -> None:
        """Register a plugin module or object; its hook names are checked against the specs."""
        name = name or getattr(plugin, "__name__", None) or repr(plugin)
        self.pm.register(plugin, name=name)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(plugin)
            raise PluginError(f"plugin {name!r} ({distribution}): {exc}") from exc
        version = version or next((d.version for d in importlib.metadata.distributions(name=distribution)), "")
        self.records.append(PluginRecord(name, distribution, version))
        self._components.clear()

    def unregister(self, name: str) -> None:
        """Remove a plugin by name (tests register and unregister small plugins)."""
        self.pm.unregister(name=name)
        self.records = [r for r in self.records if r.name != name]
        self._components.clear()

    def distribution_of(self, plugin_name: str) -> str:
        return next((r.distribution for r in self.records if r.name == plugin_name), "(local)")

    def components(self, kind: str) -> dict[str, Component]:
        """Every component of ``kind`` that loaded plugins registered, by name."""
        if kind not in KINDS:
            raise ValueError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
        if kind not in self._components:
            found: dict[str, Component] = {}
            for impl in getattr(self.pm.hook, KINDS[kind]).get_hookimpls():
                dist = self.distribution_of(impl.plugin_name)

                def register(name: str, factory: Callable[..., Any],
                             _plugin: str = impl.plugin_name, _dist: str = dist) -> None:
                    if name in found:
                        raise PluginError(
                            f"{kind} {name!r} is registered twice: by {found[name].distribution} "
                            f"(plugin {found[name].plugin}) and by {_dist} (plugin {_plugin}); "
                            f"uninstall one, or block one with --plugin no:NAME")
                    found[name] = Component(kind, name, factory, _plugin, _dist)

                offered = {"register": register, "plugins": self}
                impl.function(**{name: offered[name] for name in impl.argnames})
            self._components[kind] = found
        return self._components[kind]

    def get(self, kind: str, name: str) -> Component:
        """The component ``name`` of ``kind``; if missing, say what is there and what to install."""
        found = self.components(kind)
        if name in found:
            return found[name]
        message = (f"no {kind.replace('_', ' ')} named {name!r} is installed. "
                   f"Installed: {', '.join(sorted(found)) or 'none'}.")
        provider = next((d for d, names in KNOWN_PROVIDERS.items() if f"{kind}:{name}" in names), None)
        if provider:
            message += f" Install it with: pip install {provider}"
        if broken := "; ".join(f"{r.name}: {r.error}" for r in self.records if r.error):
            message += f" (Plugins that failed to load: {broken})"
        raise ComponentNotFoundError(message)

    def build(self, kind: str, name: str, *args: Any) -> Any:
        """Resolve ``name`` and call its factory with ``args``."""
        component = self.get(kind, name)
        return component.factory(*_arguments_for(component, args))

    def kv_transports(self, spec: DeploymentSpec) -> KVTransports:
        """The ``kv_transports(name)`` that schedulers' factories receive: it builds each of the
        deployment's KV transports once, when first asked for."""
        built: dict[str, KVTransport] = {}

        def transport(name: str) -> KVTransport:
            if name not in built:
                built[name] = self.build("kv_transport", name, spec)
            return built[name]

        return transport


#: Kinds whose factory signature grew a last argument, and that argument: a factory written
#: before still works for one minor version, with a DeprecationWarning (docs/plugins/publishing.md).
_GROWN_FACTORIES = {"batch_scheduler": "kv_transports", "job_scheduler": "kv_transports"}


def _arguments_for(component: Component, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``args``, or, for a factory of the older signature, ``args`` without the argument its kind
    gained (warning that it becomes required in FlowServe 0.2)."""
    grown = _GROWN_FACTORIES.get(component.kind)
    if grown is None:
        return args
    try:
        signature = inspect.signature(component.factory)
    except (TypeError, ValueError):  # no introspectable signature: call it as documented
        return args
    if _accepts(signature, args) or not _accepts(signature, args[:-1]):
        return args
    warnings.warn(f"{component.kind} {component.name!r} ({component.distribution}): its factory takes no "
                  f"{grown!r}; FlowServe passes it as the last argument and will require it from 0.2 "
                  "(see the factory Protocols in flowserve_core.factories)", DeprecationWarning, stacklevel=3)
    return args[:-1]


def _accepts(signature: inspect.Signature, args: tuple[Any, ...]) -> bool:
    try:
        signature.bind(*args)
    except TypeError:
        return False
    return True


def _env_list(variable: str) -> list[str] | None:
    if variable not in os.environ:
        return None
    return [item.strip() for item in os.environ[variable].split(",") if item.strip()]


@functools.cache
def get_plugin_manager() -> PluginManager:
    """A manager loaded once per process, for entry points and tools (the CLI, tests). A
    component never calls it: it is handed what it needs by its factory (``kv_transports``,
    ``plugins``), and each worker process's entry point builds its own ``PluginManager``."""
    return PluginManager()
