"""A Ray cluster for the tests of one module: local (``ray.init`` with 2 CPUs), stopped at the end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules kv_peers and ray_nodes

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    """A fresh local Ray instance with 2 CPUs (a cluster joined earlier is left first)."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="flowserve",
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}}, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
