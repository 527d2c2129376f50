"""Shared start-up resources of one server: the pre-warmed process pool and the zygotes.

``WarmPool``: K idle instance processes that already imported torch and the executors asked
for and opened their device (``prewarm`` of the executor factory), waiting for a model. A
process is taken from it as a deployment's new instance, and the pool starts a replacement
at once (``refill``). Nothing in the pool is model-specific, so one pool serves every
deployment of a server: ``shared_resources()`` gives this process's pool and zygotes;
deployments ``attach`` (adding the executors they want warmed and the pool size they ask
for) and ``detach`` (the last one out closes everything).

``Zygotes``: one zygote per model (keyed by what makes two deployments' weights the same:
executor, model file, dtype, device, context length, executor options), started with the
first deployment that forks it and shared by the others.
"""

from __future__ import annotations

import logging
import select
import socket
import subprocess
from collections import deque
from typing import Any, Sequence

import anyio
import msgspec

from flowserve_core.types import DeploymentSpec
from flowserve_instance_runtime import spawn_instance_process
from flowserve_prewarm_scaler.zygote import Zygote

log = logging.getLogger(__name__)


class PooledProcess(msgspec.Struct, kw_only=True):
    """A pre-warmed process waiting in the pool, and our end of its socket."""

    process: Any
    sock: Any

    def warm(self) -> bool:
        """True once it said hello (warming done); the hello stays unread for the instance."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)


class WarmPool:
    """Pre-warmed instance processes, shared by the deployments of one server."""

    def __init__(self, size: int = 0, warm: Sequence[str] = (), refill: bool = True):
        self.size, self.refill = size, refill
        self.warm_set: list[str] = list(warm)
        self.idle: deque[PooledProcess] = deque()
        self.closed = False

    def want(self, size: int, warm: list[str]) -> None:
        """Grow the pool to ``size`` and warm ``warm`` (``executor@device``) in new processes."""
        self.size = max(self.size, size)
        self.warm_set += [w for w in warm if w not in self.warm_set]
        self.fill()

    def fill(self) -> None:
        """Start processes until ``size`` are idle or warming (Popen does not wait for them)."""
        self._drop_dead()
        while not self.closed and len(self.idle) < self.size:
            process, sock = spawn_instance_process(warm=self.warm_set)
            self.idle.append(PooledProcess(process=process, sock=sock))

    def take(self) -> tuple[subprocess.Popen, socket.socket, str] | None:
        """An idle process — a warm one first, else the one that has warmed longest — with
        its start path (``prewarmed`` if it was warm, ``naive`` if still warming), or None
        when the pool is empty. Refills behind it."""
        self._drop_dead()
        if not self.idle:
            return None
        chosen = next((p for p in self.idle if p.warm()), self.idle[0])
        self.idle.remove(chosen)
        path = "prewarmed" if chosen.warm() else "naive"
        if self.refill:
            self.fill()
        return chosen.process, chosen.sock, path

    def _drop_dead(self) -> None:
        for pooled in [p for p in self.idle if p.process.poll() is not None]:
            log.warning("pre-warmed process %d exited (code %s); replacing it", pooled.process.pid,
                        pooled.process.poll())
            self.idle.remove(pooled)
            pooled.sock.close()

    def close(self) -> None:
        """Stop every idle process (they hold nothing: killed at once)."""
        self.closed = True
        while self.idle:
            pooled = self.idle.popleft()
            pooled.sock.close()
            pooled.process.kill()
            pooled.process.wait()


#: Options that steer scaling, scheduling or KV transfer, never the weights a zygote maps:
#: two deployments of one model file that differ only in these share a zygote.
NOT_MODEL_OPTIONS = frozenset({
    "autoscale", "pool_size", "pool_refill", "start_path", "scale_interval", "retry_on_instance_death",
    "instance_wait_timeout", "pd_on_failure", "pd_locality_slack", "hybrid_long_prompt_tokens",
    "hybrid_sequence_slack", "kv_transport_backend", "kv_transport_host", "kv_transport_timeout",
    "kv_transport_ttl"})


def zygote_key(spec: DeploymentSpec) -> bytes:
    """What must be equal for two deployments to fork from one zygote."""
    options = sorted((k, v) for k, v in spec.options.items() if k not in NOT_MODEL_OPTIONS)
    return msgspec.json.encode([spec.executor, spec.model, spec.dtype, spec.device, spec.max_model_len,
                                spec.tensor_parallel, options])


class Zygotes:
    """One zygote per model, started and pre-loaded once (concurrent askers wait for it)."""

    def __init__(self) -> None:
        self.by_key: dict[bytes, Zygote] = {}
        self._ready: dict[bytes, anyio.Event] = {}
        self._ok: dict[bytes, bool] = {}

    async def get(self, spec: DeploymentSpec) -> Zygote | None:
        """The zygote holding ``spec``'s model, or None when its executor cannot preload (then
        the zygote is closed again and ``error`` of the failed one is logged). A zygote that
        died is replaced here, by the next instance that asks."""
        key = zygote_key(spec)
        held = self.by_key.get(key)
        if held is not None and held.process.poll() is not None:
            # The zygote died (killed, out of memory): forks from it would fail one after the
            # other, so a new one pre-loads the model and the instances fork from that.
            log.warning("zygote %d of %s died (exit code %s); starting a new one", held.pid, spec.model,
                        held.process.poll(), extra={"model": spec.model})
            del self.by_key[key], self._ready[key], self._ok[key]
            with anyio.CancelScope(shield=True):
                await held.aclose()
        if key not in self._ready:
            self._ready[key] = anyio.Event()
            zygote = Zygote()
            try:
                ok = await zygote.preload(spec)
            except Exception as exc:
                ok, zygote.error = False, str(exc)
            if ok:
                self.by_key[key] = zygote
                log.info("zygote %d holds %s (pre-loaded in %.2f s)", zygote.pid, spec.model,
                         zygote.preload_seconds or 0.0, extra={"model": spec.model})
            else:
                log.warning("no fork-clone for %s: %s", spec.model, zygote.error, extra={"model": spec.model})
                with anyio.CancelScope(shield=True):
                    await zygote.aclose()
            self._ok[key] = ok
            self._ready[key].set()
        await self._ready[key].wait()
        return self.by_key.get(key) if self._ok[key] else None

    async def close(self, spec: DeploymentSpec) -> None:
        """Stop the zygote of ``spec``'s model (its last deployment went away): its memory
        returns; a later deployment of the model pre-loads it again."""
        key = zygote_key(spec)
        zygote = self.by_key.pop(key, None)
        if self._ready.get(key) is not None and self._ready[key].is_set():
            self._ready.pop(key, None)
            self._ok.pop(key, None)
        if zygote is not None:
            await zygote.aclose()

    async def aclose(self) -> None:
        for zygote in self.by_key.values():
            await zygote.aclose()
        self.by_key.clear()
        self._ready.clear()
        self._ok.clear()


class SharedResources:
    """A server's pool and zygotes, with the deployments using them counted."""

    def __init__(self) -> None:
        self.pool = WarmPool()
        self.zygotes = Zygotes()
        self.users = 0
        self._model_users: dict[bytes, int] = {}

    def attach(self, pool_size: int, warm: list[str], spec: DeploymentSpec | None = None) -> None:
        """A deployment (of ``spec``'s model) starts using the pool and its model's zygote."""
        self.users += 1
        if spec is not None:
            key = zygote_key(spec)
            self._model_users[key] = self._model_users.get(key, 0) + 1
        self.pool.closed = False
        self.pool.want(pool_size, warm)

    async def detach(self, spec: DeploymentSpec | None = None) -> None:
        """A deployment went away: its model's zygote stops once no deployment uses the model."""
        self.users -= 1
        if spec is not None:
            key = zygote_key(spec)
            self._model_users[key] = self._model_users.get(key, 1) - 1
            if self._model_users[key] <= 0 and self.users > 0:
                del self._model_users[key]
                await self.zygotes.close(spec)
        if self.users <= 0:
            global _shared
            _shared = None
            self.pool.close()
            await self.zygotes.aclose()


_shared: SharedResources | None = None


def shared_resources() -> SharedResources:
    """This server process's pool and zygotes (made on first use)."""
    global _shared
    if _shared is None:
        _shared = SharedResources()
    return _shared
