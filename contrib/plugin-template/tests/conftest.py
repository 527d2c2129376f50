"""Fixtures from FlowServe's plugin test kit: tiny_model, tiny_engine, live_server, anyio_backend."""

from flowserve_core.testing.fixtures import anyio_backend, live_server, tiny_engine, tiny_model  # noqa: F401  (pytest fixtures)
