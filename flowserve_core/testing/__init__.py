"""The plugin test kit's public path: the names of ``flowserve_testing`` (the distribution
``flowserve-testing``), re-exported and, as there, loaded on first use (so importing the kit
imports no torch). ``flowserve_core.testing.fixtures`` re-exports its pytest fixtures."""

from __future__ import annotations

from typing import Any

try:
    import flowserve_testing
except ImportError as exc:
    raise ImportError(f"the plugin test kit is not installed: pip install flowserve-testing ({exc})") from exc

__all__ = list(flowserve_testing.__all__)


def __getattr__(name: str) -> Any:
    return getattr(flowserve_testing, name)
