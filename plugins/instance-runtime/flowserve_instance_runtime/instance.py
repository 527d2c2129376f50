"""``InstanceBase``: the server's handle on an engine instance (the kernel's ``Instance``
Protocol): per-task event streams, state, drain and stop.

The instances of the scalers share this base (this distribution's ``RemoteInstance``,
flowserve-ray's ``RayInstance``, flowserve-testing's in-process ``LocalInstance`` of scaler
``inproc``) and differ only in how a task or an abort reaches the engine. It lives in the
instance runtime that scalers build on, not in the kernel, because only scalers make
instances: the kernel needs only the ``Instance`` Protocol.
"""

from __future__ import annotations

import math
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from flowserve_core.errors import EngineDeadError
from flowserve_core.types import InstanceInfo, InstanceState, InstanceStats, Task, TokenEvent


class InstanceBase:
    """Routes an instance's events to the task streams opened by ``submit``.

    Subclasses implement ``run`` (start the engine, call ``mark_ready()``, serve until it
    ends) and the three methods this class calls: ``send_task``, ``abort_task`` and
    ``shutdown``; they hand events back with ``dispatch`` and ``fail_all``.
    """

    def __init__(self, info: InstanceInfo):
        self.info = info
        self.stats = InstanceStats()
        self.on_change: Callable[[], None] = lambda: None
        self._streams: dict[str, MemoryObjectSendStream[TokenEvent]] = {}
        self._idle = anyio.Event()

    @property
    def num_tasks(self) -> int:
        return len(self._streams)

    def set_state(self, state: InstanceState, error: str | None = None) -> None:
        if self.info.state is not state:
            self.info.move_to(state)
            self.info.error = error or self.info.error
            self.on_change()

    def mark_ready(self) -> bool:
        """Warming → ready. False when the instance was stopped while warming: it must end."""
        if self.info.state is not InstanceState.WARMING:
            return False
        self.set_state(InstanceState.READY)
        return True

    @asynccontextmanager
    async def submit(self, task: Task) -> AsyncIterator[MemoryObjectReceiveStream[TokenEvent]]:
        """Run ``task`` here; iterate the stream for its events. Leaving early aborts it."""
        if self.info.state is not InstanceState.READY:
            raise EngineDeadError(f"instance {self.info.id} is {self.info.state.value}")
        send, receive = anyio.create_memory_object_stream[TokenEvent](math.inf)
        task.instance_id = self.info.id
        self._streams[task.id] = send
        try:
            await self.send_task(task)
            with receive:
                yield receive
        finally:
            if self._streams.pop(task.id, None) is not None:
                send.close()
                with anyio.CancelScope(shield=True):
                    await self.abort_task(task.id)
            self._check_idle()

    def dispatch(self, events: list[TokenEvent]) -> None:
        """Deliver one step's events to their task streams."""
        for event in events:
            stream = self._streams.get(event.task_id)
            if stream is None:
                continue
            stream.send_nowait(event)
            if event.finish_reason:
                del self._streams[event.task_id]
                stream.close()
        self._check_idle()

    def fail_all(self, error: str) -> None:
        """End every open task with an error event (the engine died)."""
        self.dispatch([TokenEvent(task_id=t, finish_reason="error", error=error, instance_failed=True)
                       for t in list(self._streams)])

    async def stop(self, drain_timeout: float = 0.0) -> None:
        """Take no new tasks, let running ones finish for up to ``drain_timeout`` s, then stop."""
        if self.info.state in (InstanceState.WARMING, InstanceState.READY):
            self.set_state(InstanceState.DRAINING)
        with anyio.move_on_after(drain_timeout):
            while self._streams:
                self._idle = anyio.Event()
                await self._idle.wait()
        self.fail_all(f"instance {self.info.id} stopped")
        await self.shutdown()

    def _check_idle(self) -> None:
        if not self._streams:
            self._idle.set()

    async def send_task(self, task: Task) -> None:
        """Subclasses: start ``task`` on the engine (``submit`` has opened its stream)."""
        raise NotImplementedError

    async def abort_task(self, task_id: str) -> None:
        """Subclasses: abort ``task_id`` on the engine (its stream was left early)."""
        raise NotImplementedError

    async def shutdown(self) -> None:
        """Subclasses: end the engine now (``stop`` calls it after draining); ``run`` returns."""
        raise NotImplementedError
