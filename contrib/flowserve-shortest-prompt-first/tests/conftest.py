"""Fixtures from FlowServe's plugin test kit."""

from flowserve_core.testing.fixtures import anyio_backend, tiny_engine  # noqa: F401  (pytest fixtures)
