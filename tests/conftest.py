"""Fixtures for the kernel's tests: the plugin test kit's, as its docs tell plugin authors to use them."""

from flowserve_testing.fixtures import live_server, tiny_engine, tiny_model  # noqa: F401  (pytest fixtures)
