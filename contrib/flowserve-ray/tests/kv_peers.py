"""A test helper actor: a process of the cluster that publishes or fetches KV bytes through
the ``ray`` KV transport, as a prefill or decode instance would."""

from __future__ import annotations

import hashlib
import os


class KVPeer:
    """Builds the ``ray`` KV transport in its own process (through the plugin manager)."""

    def __init__(self) -> None:
        from flowserve_core.plugins import get_plugin_manager
        from flowserve_core.types import DeploymentSpec

        self.transport = get_plugin_manager().build("kv_transport", "ray", DeploymentSpec(kv_transport="ray"))

    def publish(self, size: int, seed: int) -> tuple[str, str]:
        """Publish ``size`` pseudo-random bytes; (locator, their sha256)."""
        data = (hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1))[:size]
        return self.transport.publish(memoryview(data), f"seq-{seed}"), hashlib.sha256(data).hexdigest()

    def fetch(self, locator: str, nbytes: int) -> str:
        """The sha256 of what ``locator`` holds."""
        from flowserve_core.types import KVHandoff

        view = self.transport.fetch(KVHandoff(transport="ray", locator=locator, num_tokens=0, block_size=16,
                                              nbytes=nbytes))
        return hashlib.sha256(view).hexdigest()

    def release(self, locator: str) -> None:
        self.transport.release(locator)

    def where(self) -> tuple[str, int]:
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()


def peer_on(node_id: str | None = None):
    """A ``KVPeer`` actor (0 CPUs), on ``node_id`` if given."""
    import sys

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    options = {"num_cpus": 0}
    if node_id:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return ray.remote(KVPeer).options(**options).remote()
