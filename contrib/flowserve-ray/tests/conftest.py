"""Ray for the tests: one local instance (``ray.init`` with 2 CPUs) shared by the tests that
want it, stopped at the end of the session or when a test needs another cluster."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules kv_peers and ray_nodes

ray = pytest.importorskip("ray")

from ray_nodes import LOCAL  # noqa: E402  (after the importorskip above)


@pytest.fixture(scope="session")
def _stop_local_ray_at_the_end():
    yield
    if LOCAL.up:
        ray.shutdown()
        LOCAL.up = False


@pytest.fixture
def local_ray(_stop_local_ray_at_the_end):
    """A local Ray instance with 2 CPUs, started on first use (a cluster joined earlier is left)."""
    if not LOCAL.up:
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="flowserve",
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}}, log_to_driver=False)
        LOCAL.up = True
    return ray
