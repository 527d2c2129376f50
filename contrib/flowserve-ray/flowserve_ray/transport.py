"""KV transport ``ray``: a prefill instance's exported KV blocks as Ray objects, fetchable
by a decode instance on any node of the cluster.

``publish`` puts the bytes into the object store of the publisher's node and files the
reference with the namespace's ``KVExchange`` actor under a fresh locator; ``fetch`` asks
the exchange for the reference and gets the bytes (zero copy on the same node; Ray moves
them between nodes); ``release`` drops it. Only the reference crosses the exchange, never
the KV bytes. The publisher owns the object (Ray 2.56 removed ``ray.put(_owner=…)``): KV
of a prefill actor that dies before its decode fetched it is lost, and ``fetch`` says so
(``KVLostError``), as a dead prefill instance's shared memory would be.

Used wherever the job scheduler's transport hook builds it: in engine actors of the ``ray``
scaler (already connected), or any process that can join the cluster (``$RAY_ADDRESS``).
"""

from __future__ import annotations

import uuid
from typing import Any

from flowserve_core.errors import ConfigError
from flowserve_core.types import DeploymentSpec, KVHandoff
from flowserve_ray.cluster import NAMESPACE

EXCHANGE_NAME = "flowserve-kv-exchange"


class KVLostError(KeyError):
    """The KV blocks under a locator are gone (released, or their publisher died)."""


class KVExchange:
    """A named actor keeping ``locator → [ObjectRef]`` of published KV blocks."""

    def __init__(self) -> None:
        self.held: dict[str, list[Any]] = {}

    def hold(self, locator: str, refs: list[Any]) -> None:
        self.held[locator] = refs

    def lookup(self, locator: str) -> list[Any] | None:
        return self.held.get(locator)

    def drop(self, locator: str) -> bool:
        return self.held.pop(locator, None) is not None

    def count(self) -> int:
        return len(self.held)


def exchange(namespace: str = NAMESPACE) -> Any:
    """The namespace's ``KVExchange`` actor, created by the first process that needs it
    (detached: it serves every deployment of the namespace until the cluster stops)."""
    import ray

    return ray.remote(KVExchange).options(
        name=EXCHANGE_NAME, namespace=namespace, get_if_exists=True, lifetime="detached",
        num_cpus=0, max_restarts=-1).remote()


class RayObjectTransport:
    """``interfaces.KVTransport`` over Ray objects (see the module docstring)."""

    def __init__(self, spec: DeploymentSpec):
        import ray

        if not ray.is_initialized():
            from flowserve_ray.cluster import connect

            address = str(spec.options.get("ray_address", "")) or "auto"
            try:
                connect(address, str(spec.options.get("ray_namespace", NAMESPACE)))
            except ConfigError as exc:
                raise ConfigError(f"KV transport 'ray' needs a Ray cluster: run the instances with "
                                  f"--scaler ray, or set RAY_ADDRESS ({exc})") from None
        self.namespace = str(spec.options.get("ray_namespace", NAMESPACE))
        self.exchange = exchange(self.namespace)

    def publish(self, data: bytes | memoryview, key: str) -> str:
        """Put ``data`` into the object store; the locator to put in a ``KVHandoff``."""
        import numpy as np
        import ray

        locator = f"{key}-{uuid.uuid4().hex[:12]}"
        array = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        ref = ray.put(array)
        ray.get(self.exchange.hold.remote(locator, [ref]))
        return locator

    def fetch(self, handoff: KVHandoff) -> memoryview:
        """The bytes published under ``handoff.locator`` (read-only, zero copy on this node)."""
        import ray

        refs = ray.get(self.exchange.lookup.remote(handoff.locator))
        if refs is None:
            raise KVLostError(f"no KV blocks are published under {handoff.locator!r} (released, or "
                              f"published in another namespace than {self.namespace!r})")
        try:
            array = ray.get(refs[0])
        except ray.exceptions.ObjectLostError as exc:
            self.exchange.drop.remote(handoff.locator)
            raise KVLostError(f"the KV blocks under {handoff.locator!r} are lost: the instance that "
                              f"published them is gone ({type(exc).__name__})") from None
        return memoryview(array).cast("B")  # the view keeps the array (and its pages) alive

    def release(self, locator: str) -> None:
        """Drop the blocks under ``locator`` (Ray frees them once nobody holds them)."""
        import ray

        ray.get(self.exchange.drop.remote(locator))
