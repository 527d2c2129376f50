"""The server's side of an instance process: starting one (``spawn_instance_process``) and
the handle that speaks ``protocol`` with it (``RemoteInstance``).

A scaler that runs instances as processes makes a ``RemoteInstance`` either with the socket
and process it started, or with a ``Launcher`` that gives them when the instance runs (the
``prewarm`` scaler takes a pre-warmed process from its pool or forks one from a zygote).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any, Awaitable, Callable, Protocol

import anyio

from flowserve_core.errors import EngineDeadError
from flowserve_core.types import DeploymentSpec, InstanceInfo, InstanceState, Task
from flowserve_instance_runtime.instance import InstanceBase
from flowserve_instance_runtime.protocol import (
    Abort,
    Assign,
    Channel,
    Events,
    Failed,
    Hello,
    Ready,
    Shutdown,
    Submit,
    heartbeat_timeout,
)

log = logging.getLogger(__name__)

#: The module an instance process runs (``python -m``).
WORKER_MODULE = "flowserve_instance_runtime.worker"


class ProcessHandle(Protocol):
    """What a scaler knows of a process it started (a ``subprocess.Popen`` fits)."""

    pid: int

    def kill(self) -> None: ...

    def poll(self) -> int | None: ...


def spawn_instance_process(env: dict[str, str] | None = None,
                           warm: list[str] | None = None) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start a fresh ``python -m flowserve_instance_runtime.worker`` process; return it and our
    socket end. With ``warm`` (``executor@device`` names) it is a pre-warmed process: it loads
    the plugins and warms those executors before saying hello."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [sys.executable, "-m", WORKER_MODULE, str(theirs.fileno())]
    if warm is not None:
        argv += ["--warm", ",".join(warm)]
    process = subprocess.Popen(argv, pass_fds=[theirs.fileno()], env={**os.environ, **(env or {})})
    theirs.close()
    return process, ours


#: An async callable giving an instance its process: ``(process, socket, start_path)``.
Launcher = Callable[[], Awaitable[tuple[ProcessHandle | None, socket.socket, str]]]


class RemoteInstance(InstanceBase):
    """The server's handle on an instance process connected through ``sock``, or through
    what ``launcher`` gives when the instance runs (a pre-warmed or forked process).

    ``preload`` asks the process to map the model's DRAM image first; ``attach`` (set before
    the instance runs) hands it the IPC handles of device weights a zygote holds.
    ``start_seconds`` counts from the handle's creation (the scaler's decision) to ready.
    """

    def __init__(self, spec: DeploymentSpec, info: InstanceInfo, sock: socket.socket | None = None,
                 process: ProcessHandle | None = None, start_timeout: float = 600.0, *,
                 launcher: Launcher | None = None, preload: bool = False):
        super().__init__(info)
        self.spec, self.process, self.start_timeout = spec, process, start_timeout
        self.preload = preload
        self.attach = b""
        self._sock, self._launcher = sock, launcher
        self._created = time.monotonic()
        self.channel: Channel | None = None

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        error = "the instance process exited"
        try:
            with anyio.fail_after(self.start_timeout):
                if self._launcher is not None:
                    self.process, self._sock, self.info.start_path = await self._launcher()
                assert self._sock is not None  # given, or made by the launcher
                self.channel = await Channel.from_socket(self._sock)
                hello = await self.channel.receive()
                self.info.pid = hello.pid if isinstance(hello, Hello) else None
                await self.channel.send(Assign(spec=self.spec, info=self.info, preload=self.preload,
                                               attach=self.attach))
                ready = await self.channel.receive()
            if isinstance(ready, Failed):
                raise RuntimeError(ready.error)
            if not isinstance(ready, Ready):
                raise RuntimeError(f"the instance process said {type(ready).__name__} instead of Ready")
            self.info.start_path = ready.start_path or self.info.start_path or "naive"
            self.info.start_seconds = time.monotonic() - self._created
            if ready.note:
                log.info("instance %s started %s: %s", self.info.id, self.info.start_path, ready.note,
                         extra={"instance": self.info.id, "start_path": self.info.start_path})
            if not self.mark_ready():
                await self.shutdown()  # stopped while warming
                return
            task_status.started()
            quiet = heartbeat_timeout(self.spec)
            while True:
                with anyio.move_on_after(quiet) as silent:
                    message = await self.channel.receive()
                if silent.cancelled_caught:
                    error = (f"the instance process sent nothing, not even a heartbeat, for {quiet:g} s "
                             f"(heartbeat_timeout_seconds): it is frozen or hung, so it was killed")
                    log.error("instance %s: %s", self.info.id, error, extra={"instance": self.info.id})
                    if self.process is not None:
                        self.process.kill()  # SIGKILL also ends a stopped process
                    break
                if isinstance(message, Events):
                    self.stats = message.stats
                    self.dispatch(message.events)
                elif isinstance(message, Failed):
                    error = message.error
        except anyio.EndOfStream:
            pass
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.error("instance %s failed: %s", self.info.id, error, extra={"instance": self.info.id},
                      exc_info=not isinstance(exc, TimeoutError))
        finally:
            self.fail_all(f"instance {self.info.id} is gone: {error}")
            self.set_state(InstanceState.GONE, error=error)
            with anyio.CancelScope(shield=True):
                await self._reap()

    async def _reap(self) -> None:
        if self.channel is not None:
            await self.channel.aclose()
        elif self._sock is not None:
            self._sock.close()
        if self.process is None:
            return
        with anyio.move_on_after(5):
            while self.process.poll() is None:
                await anyio.sleep(0.05)
        if self.process.poll() is None:
            self.process.kill()

    async def send_task(self, task: Task) -> None:
        assert self.channel is not None  # tasks come once the instance is ready
        try:
            await self.channel.send(Submit(task=task))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            # The process died and nobody noticed yet: the task never ran, so it may go elsewhere.
            raise EngineDeadError(f"instance {self.info.id} is gone ({type(exc).__name__})") from None

    async def abort_task(self, task_id: str) -> None:
        assert self.channel is not None  # tasks come once the instance is ready
        try:
            await self.channel.send(Abort(task_id=task_id))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the instance is gone; nothing runs to abort

    async def shutdown(self) -> None:
        if self.channel is None:
            return  # still launching: ``run`` ends when it sees the state
        try:
            await self.channel.send(Shutdown())
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
