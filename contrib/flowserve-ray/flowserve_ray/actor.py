"""The engine actor: one FlowServe engine instance living in a Ray worker process.

An async actor (its methods run on the worker's event loop, driven here through anyio):

- ``warm(executors)`` (optional, for a pool of idle actors) imports and warms ahead of demand;
- ``start(setup)`` builds the engine (weights mapped from the object store when the scaler
  put them there; a tensor-parallel instance's ranks 1 … N-1 as ``RankActor``s on the
  placement group it gets, see ``ranks.py``) and answers ``ActorReady``;
- ``run()`` drives the engine until it dies, a rank actor ends, or ``shutdown()``; it
  returns why it ended;
- ``events()`` is a streaming generator (``num_returns="streaming"``) of ``EventBatch``
  bytes: every step's events as they come, and an empty batch (a heartbeat) every
  ``heartbeat_interval`` seconds of quiet;
- ``submit(task)`` / ``abort(task_id)`` reach the engine between steps.

The server awaits ``submit`` before it may send an ``abort`` for that task, so the two
never overtake each other even though an async actor does not order its calls.

The actor's constructor is its process's composition root: it builds the plugin manager
once (``PluginManager()`` reads the same allow and block variables as the server) and
passes it to what needs it (the executors' warm-up, ``build_engine``).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, AsyncIterator

import anyio
import msgspec

from flowserve_core.interfaces import ClosableExecutor, ReportsWeightsPath
from flowserve_core.plugins import PluginManager
from flowserve_core.types import Task, TokenEvent
from flowserve_ray.protocol import ActorReady, EventBatch, decode_setup, encode

log = logging.getLogger(__name__)

_decode_task = msgspec.msgpack.Decoder(Task).decode


def heartbeat_interval(step_timeout: float) -> float:
    """Seconds between heartbeats: a quarter of the step timeout, at most 1 s."""
    return max(0.05, min(1.0, step_timeout / 4))


class EngineActor:
    """A FlowServe engine instance as a Ray actor (see the module docstring)."""

    def __init__(self) -> None:
        self.pm = PluginManager()
        self.engine: Any = None
        self.spec: Any = None
        self._send, self._receive = anyio.create_memory_object_stream[list[TokenEvent]](math.inf)
        self._scope: anyio.CancelScope | None = None
        self._stopped = False
        self.ranks: Any = None  # the RayRankLauncher of a tensor-parallel instance
        self._rank_dead: str | None = None
        #: data addresses of the weights this actor mapped from the object store (none: it
        #: did not map them); ``weights_mappings`` resolves them
        self._mapped_weights: list[int] = []

    async def warm(self, executors: list[str]) -> list[str]:
        """Pre-warm this idle actor: warm each ``executor@device`` (the instance runtime's
        ``warm_executors``: torch imported, device opened). The warmed ones."""
        from flowserve_instance_runtime import warm_executors

        return await anyio.to_thread.run_sync(warm_executors, self.pm, executors)

    async def start(self, setup: bytes, weights: list[Any] | None = None, index: bytes = b"",
                    placement_group: Any = None) -> bytes:
        """Build the engine. ``weights`` is ``[ObjectRef]`` of the model's DRAM image in the
        object store (in a list, so Ray hands over the reference, not the data) and ``index``
        its tensor index; without them the executor loads the weights itself.
        ``placement_group``: the instance's gang (tensor parallelism; this actor is in bundle
        0), whose other bundles get the ranks 1 … N-1."""
        import ray

        from flowserve_core.engine import build_engine
        from flowserve_core.telemetry import setup_logging

        request = decode_setup(setup)
        setup_logging(request.log_level)
        self.spec = request.spec
        start_path, note = "loaded", ""
        if weights:
            from flowserve_ray.weights import map_shared_weights

            note, self._mapped_weights = await anyio.to_thread.run_sync(
                map_shared_weights, self.spec, weights[0], index, self.pm)
            start_path = "object-store" if not note else "loaded"
        if placement_group is not None and self.spec.tensor_parallel > 1:
            self.engine = await self._build_with_rank_actors(request, placement_group)
        else:
            self.engine = await build_engine(self.spec, self.pm, self._emit)
        if start_path == "object-store" and _weights_path(self.engine.executor) != "preloaded":
            start_path, note = "loaded", "the executor did not take the mapped weights"
        return encode(ActorReady(kv=self.engine.executor.kv_cache_spec(), start_path=start_path,
                                 pid=os.getpid(), node_id=ray.get_runtime_context().get_node_id(),
                                 note=note))

    async def _build_with_rank_actors(self, request: Any, placement_group: Any) -> Any:
        """Build the engine with the ``spmd`` executor's worker ranks as ``RankActor``s."""
        from flowserve_core.engine import build_engine
        from flowserve_ray.cluster import read_options
        from flowserve_ray.ranks import RayRankLauncher
        from flowserve_spmd_executor.launch import use_rank_launcher

        options = read_options(self.spec)
        self.ranks = await anyio.to_thread.run_sync(lambda: RayRankLauncher(
            placement_group, options.rank_resources(self.spec), namespace=options.ray_namespace,
            name=f"flowserve-{self.spec.name or 'model'}-{request.info.id}"))
        # One engine per actor process: the launcher is this process's while the executor
        # starts its ranks (the executor takes it at construction).
        previous = use_rank_launcher(self.ranks)
        try:
            return await build_engine(self.spec, self.pm, self._emit)
        finally:
            use_rank_launcher(previous)

    async def _watch_ranks(self, scope: anyio.CancelScope) -> None:
        """End ``run`` when a rank actor ends, even while the engine is idle (a step would
        find out only when the next request comes)."""
        while True:
            await anyio.sleep(0.5)
            reason = self.ranks.dead_reason()
            if reason:
                self._rank_dead = reason
                log.error("engine actor: %s", reason)
                scope.cancel()
                return

    async def _emit(self, events: list[TokenEvent]) -> None:
        self._send.send_nowait(events)

    async def run(self) -> str:
        """Drive the engine until it dies (its reason) or ``shutdown`` ("stopped")."""
        with anyio.CancelScope() as self._scope:
            if not self._stopped:
                async with anyio.create_task_group() as tg:
                    if self.ranks is not None:
                        tg.start_soon(self._watch_ranks, tg.cancel_scope)
                    await self.engine.run()
                    tg.cancel_scope.cancel()
        self._send.close()
        return self.engine.dead or self._rank_dead or "stopped"

    async def events(self) -> AsyncIterator[bytes]:
        """Stream ``EventBatch`` bytes until the engine stops (use ``num_returns="streaming"``)."""
        quiet = heartbeat_interval(self.spec.step_timeout_seconds)
        while True:
            batch: list[TokenEvent] = []
            with anyio.move_on_after(quiet):
                try:
                    batch = list(await self._receive.receive())
                except anyio.EndOfStream:
                    return
            while True:  # whatever else is queued goes in the same batch
                try:
                    batch += self._receive.receive_nowait()
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            yield encode(EventBatch(events=batch, stats=self.engine.stats))

    async def submit(self, task: bytes) -> None:
        """Queue a task (msgpack ``Task``); raises ``EngineDeadError`` on a dead engine."""
        self.engine.submit(_decode_task(task))

    async def abort(self, task_id: str) -> None:
        if self.engine is not None and not self.engine.dead:
            self.engine.abort(task_id)

    async def shutdown(self) -> None:
        """Stop the engine; ``run`` returns and ``events`` ends."""
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()
        if self.engine is not None and isinstance(self.engine.executor, ClosableExecutor):
            await anyio.to_thread.run_sync(self.engine.executor.close)

    async def rank_listen_host(self) -> str:
        """Where rank 0 listens for its rank actors ('' for a single rank): 127.0.0.1 when
        the gang is on this node, else the node's address (diagnostics and tests)."""
        return self.ranks.listen_host if self.ranks is not None else ""

    async def ping(self) -> int:
        """The actor's pid (tests use it to kill the process behind an instance)."""
        return os.getpid()

    async def weights_mappings(self) -> list[str]:
        """For every weight of the model this actor mapped from the object store, the
        ``/proc/self/maps`` path of the memory holding it ('' for anonymous memory); none when
        it mapped no weights. The executor took that very model when the start path is
        ``object-store`` (it reports ``preloaded``): tests check the weights it computes with
        are Ray's shared object store."""
        if not self._mapped_weights:
            return []
        with open("/proc/self/maps") as maps:
            spans = [(int(lo, 16), int(hi, 16), parts[5] if len(parts) > 5 else "")
                     for parts in (line.split() for line in maps)
                     for lo, hi in [parts[0].split("-")]]
        return [next((path for lo, hi, path in spans if lo <= address < hi), "")
                for address in self._mapped_weights]


def _weights_path(executor: object) -> str | None:
    """How the executor got its weights, if it says (``ReportsWeightsPath``)."""
    return executor.weights_path if isinstance(executor, ReportsWeightsPath) else None
