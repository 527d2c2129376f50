"""Fixtures shared by every test in the repository (kernel, plugins, contrib)."""

from __future__ import annotations

import os

# No test downloads from the Hugging Face Hub (FlowServe downloads a Hub id that is not in the
# local cache): set before huggingface_hub is imported, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402  (after HF_HUB_OFFLINE is set)

from flowserve_core.plugins import PluginManager  # noqa: E402  (after HF_HUB_OFFLINE is set)


@pytest.fixture
def pm() -> PluginManager:
    return PluginManager()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
