"""The plugin test kit's pytest fixtures (``flowserve_testing.fixtures``). In ``conftest.py``::

    from flowserve_core.testing.fixtures import anyio_backend, live_server, tiny_engine, tiny_model
"""

from flowserve_testing.fixtures import anyio_backend, live_server, tiny_engine, tiny_model

__all__ = ["anyio_backend", "live_server", "tiny_engine", "tiny_model"]
