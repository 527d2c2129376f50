"""What the conformance suites share: the error they raise and how they find a factory."""

from __future__ import annotations

from typing import Any, Callable

from flowserve_core.plugins import PluginManager
from flowserve_testing.plugin import with_kit_plugin


class ConformanceError(AssertionError):
    """A component broke a rule of its Protocol; the message states the rule and what happened."""


def require(ok: Any, rule: str, detail: str = "") -> None:
    """Raise ``ConformanceError`` stating ``rule`` (and ``detail``) unless ``ok``."""
    if not ok:
        raise ConformanceError(f"{rule}{': ' + detail if detail else ''}")


def resolve(component: str | Callable[..., Any], kind: str, pm: PluginManager | None) -> Callable[..., Any]:
    """A component's factory: itself, or the one registered under that name."""
    if isinstance(component, str):
        return (pm or with_kit_plugin(PluginManager())).get(kind, component).factory
    return component
