"""Fixtures shared by every test in the repository (kernel, plugins, contrib)."""

from __future__ import annotations

import pytest

from flowserve_core.plugins import PluginManager


@pytest.fixture
def pm() -> PluginManager:
    return PluginManager()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
