"""Tensor-parallel ranks 1 … N-1 as Ray actors, each on its own bundle of the instance's
placement group.

The engine actor (rank 0, bundle 0) installs a ``RayRankLauncher`` as the ``spmd``
executor's rank launcher (``flowserve_spmd_executor.launch``) while it builds its engine:
the executor then asks it for its worker ranks instead of starting child processes. Each
rank is a ``RankActor`` created on bundle ``rank`` of the group (``max_restarts=0``); its
``serve`` call connects back to rank 0, proves its rank with the token rank 0 made for it,
and runs the ``spmd`` worker loop until rank 0 says stop. Ray places it (any strategy:
``STRICT_PACK`` keeps the gang on one node, ``PACK``/``SPREAD`` may split it), accounts for
its resources and tells its end: the ``serve`` call's result is the rank's exit, and an actor
that died fails it with ``RayActorError``.

Rank 0 listens on 127.0.0.1 when every bundle is on its node, else on its node's address.
The rank actors are owned by the engine actor (they die with it) and live in the placement
group (removing the group, as the instance does when it ends, kills them too).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import msgspec

log = logging.getLogger(__name__)


class RankActor:
    """One worker rank of a tensor-parallel engine instance (see the module docstring)."""

    def serve(self, address: bytes) -> int:
        """Connect to rank 0 at ``address`` (a msgpack ``ControlAddress``) and run the worker
        loop; the loop's exit code (0: told to stop, or rank 0 went away)."""
        import ray

        from flowserve_core.plugins import PluginManager
        from flowserve_spmd_executor.launch import ControlAddress
        from flowserve_spmd_executor.worker import connect_to_rank0, serve

        control = msgspec.msgpack.decode(address, type=ControlAddress)
        channel = connect_to_rank0(control)
        try:
            # Ray shows a rank only the accelerator it reserved, as index 0.
            # this actor's process is the rank's entry point: it builds its own manager
            return serve(channel, plugins=PluginManager(), local_device_index=0 if ray.get_gpu_ids() else None)
        finally:
            channel.close()

    def where(self) -> tuple[str, int]:
        """This rank's node id and process id."""
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()


class RayRankHandle:
    """Rank 0's handle on one ``RankActor``: its ``serve`` call tells when and why it ended."""

    def __init__(self, rank: int, actor: Any, served: Any):
        self.rank, self.actor, self.served = rank, actor, served
        self._future = served.future()

    def exit_reason(self) -> str | None:
        if not self._future.done():
            return None
        from ray.exceptions import RayActorError

        try:
            code = self._future.result()
        except RayActorError as exc:
            return f"{self} died: {_first_line(exc)}"
        except Exception as exc:
            return f"{self} failed: {type(exc).__name__}: {_first_line(exc)}"
        return f"{self} ended its rank loop with code {code}"

    def stop(self, timeout: float) -> None:
        import ray

        try:
            self._future.result(timeout=timeout)
        except Exception:  # still running, or already dead: it goes either way
            pass
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:
            pass

    def __str__(self) -> str:
        return f"Ray actor {self.actor._actor_id.hex()}"


class RayRankLauncher:
    """Starts the worker ranks of one tensor-parallel instance as ``RankActor``s on bundles
    1 … N-1 of ``placement_group``, each reserving ``resources`` (``{"CPU": …, "GPU": …}``)."""

    def __init__(self, placement_group: Any, resources: dict[str, float], *, namespace: str, name: str):
        import ray

        self.placement_group, self.resources = placement_group, resources
        self.namespace, self.name = namespace, name
        self.handles: list[RayRankHandle] = []
        table = ray.util.placement_group_table(placement_group)
        nodes = set(table.get("bundles_to_node_id", {}).values())
        here = ray.get_runtime_context().get_node_id()
        #: 127.0.0.1 when the whole gang is on this node; else this node's address
        self.listen_host = "127.0.0.1" if nodes <= {here} else ray.util.get_node_ip_address()

    def launch(self, setup: Any, link: Any) -> RayRankHandle:
        """Create the actor of ``setup.rank`` on bundle ``setup.rank`` and start its loop."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from flowserve_spmd_executor.launch import ControlAddress

        if not isinstance(link, ControlAddress):
            raise TypeError("Ray rank actors connect to rank 0: they need a ControlAddress")
        # Any: Ray types an actor's methods as the plain methods, without their ``.remote``
        actor: Any = ray.remote(RankActor).options(
            name=f"{self.name}-rank{setup.rank}", namespace=self.namespace, max_restarts=0,
            max_concurrency=2,  # ``where`` answers while ``serve`` runs
            num_cpus=self.resources.get("CPU", 0), num_gpus=self.resources.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.placement_group, placement_group_bundle_index=setup.rank)).remote()
        handle = RayRankHandle(setup.rank, actor, actor.serve.remote(msgspec.msgpack.encode(link)))
        self.handles.append(handle)
        log.info("tensor-parallel rank %d of %s: Ray actor %s on bundle %d", setup.rank, self.name,
                 actor._actor_id.hex(), setup.rank, extra={"rank": setup.rank, "listen_host": self.listen_host})
        return handle

    def dead_reason(self) -> str | None:
        """Why a rank actor ended, or None while all run (never blocks)."""
        for handle in self.handles:
            reason = handle.exit_reason()
            if reason:
                return f"tensor-parallel rank {handle.rank} died: {reason}"
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
