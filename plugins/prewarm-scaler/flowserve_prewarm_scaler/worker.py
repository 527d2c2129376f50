"""Engine instances in their own processes, and the protocol the server speaks with them.

The server and an instance process share one connected Unix socket (a socketpair made by
the scaler; nothing listens on the filesystem or the network). Frames are length-prefixed
msgpack messages. The instance says ``Hello``, waits for an ``Assign`` (a pre-warmed
process may wait a long time), builds its engine, says ``Ready``, then takes ``Submit`` and
``Abort`` and sends one ``Events`` frame per engine step. When the server's end closes, the
instance exits; when the instance dies, the server fails its tasks. A ready instance also
sends an empty ``Events`` frame (a heartbeat) every ``heartbeat_interval(spec)`` seconds,
from its event loop, which keeps running while a step computes in a thread: so silence
means the process is frozen (SIGSTOP, a stuck interpreter), not that a step is long. A
process that sends nothing for ``heartbeat_timeout(spec)`` seconds (option
``heartbeat_timeout_seconds``, default 5) is killed and its tasks fail, as if it had died.
A step that is merely long is the engine's business: it dies after ``step_timeout_seconds``.

Run an instance process with ``python -m flowserve_prewarm_scaler.worker FD``.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any, Awaitable, Callable, Protocol, Sequence

import anyio
import anyio.abc
import msgspec
from anyio.streams.buffered import BufferedByteReceiveStream

from flowserve_core.engine import build_engine
from flowserve_core.errors import EngineDeadError
from flowserve_core.interfaces import ClosableExecutor
from flowserve_core.plugins import get_plugin_manager
from flowserve_core.types import (
    DeploymentSpec,
    InstanceInfo,
    InstanceState,
    InstanceStats,
    KVCacheSpec,
    Task,
    TokenEvent,
)
from flowserve_prewarm_scaler.instance import InstanceBase
from flowserve_prewarm_scaler.startup import attach_weights, preload_model, warm_executors, weights_path

log = logging.getLogger(__name__)
MAX_FRAME = 256 * 1024 * 1024


class Hello(msgspec.Struct, tag=True):
    """The instance process is up (and, if it is a pre-warmed one, warm)."""

    pid: int
    warmed: list[str] = []


class Assign(msgspec.Struct, tag=True):
    """Become an instance of ``spec``. With ``preload``, first map the model's weights from
    their DRAM image (the executor factory's ``preload``), falling back to loading."""

    spec: DeploymentSpec
    info: InstanceInfo
    preload: bool = False
    #: IPC handles of device weights a zygote holds (the executor factory's ``attach``)
    attach: bytes = b""


class Ready(msgspec.Struct, tag=True):
    """The engine is built; ``start_path`` says how (``naive``, ``prewarmed``, ``preloaded``,
    ``forked``), ``note`` why a faster path was not taken."""

    kv: KVCacheSpec
    start_path: str = ""
    note: str = ""


class Submit(msgspec.Struct, tag=True):
    task: Task


class Abort(msgspec.Struct, tag=True):
    task_id: str


class Events(msgspec.Struct, tag=True):
    events: list[TokenEvent]
    stats: InstanceStats


class Failed(msgspec.Struct, tag=True):
    error: str


class Shutdown(msgspec.Struct, tag=True):
    pass


#: Seconds of silence after which a ready instance process is taken for frozen.
HEARTBEAT_TIMEOUT = 5.0


def heartbeat_timeout(spec: DeploymentSpec) -> float:
    """Seconds of silence that make a ready instance process frozen: option
    ``heartbeat_timeout_seconds`` (default 5), at most ``step_timeout_seconds``."""
    return min(float(spec.options.get("heartbeat_timeout_seconds", HEARTBEAT_TIMEOUT)), spec.step_timeout_seconds)


def heartbeat_interval(spec: DeploymentSpec) -> float:
    """Seconds between a ready instance's heartbeats: a tenth of the heartbeat timeout (ten
    may be late on a busy machine before it counts), at most 0.5 s."""
    return max(0.05, min(0.5, heartbeat_timeout(spec) / 10))


Message = Hello | Assign | Ready | Submit | Abort | Events | Failed | Shutdown


class SocketBytes(anyio.abc.ByteStream):
    """A connected socket as an anyio byte stream, waiting with ``anyio.wait_readable`` /
    ``wait_writable``. (anyio's own UNIXSocketStream on asyncio can raise InvalidStateError
    from a loop callback when a receive is cancelled just as data arrives, which happens when
    many instance processes stop at once on a busy machine.)"""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.sock = sock

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while True:
            try:
                data = self.sock.recv(max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self.sock)
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError from exc
            if not data:
                raise anyio.EndOfStream
            return data

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        while view:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                await anyio.wait_writable(self.sock)
            except OSError as exc:
                raise anyio.BrokenResourceError from exc

    async def send_eof(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    async def aclose(self) -> None:
        if self.sock.fileno() >= 0:
            anyio.notify_closing(self.sock)  # wakes a receive waiting on it (ClosedResourceError)
            self.sock.close()


class Channel:
    """Length-prefixed msgpack ``Message`` frames over a connected socket."""

    _encoder = msgspec.msgpack.Encoder()
    _decoder = msgspec.msgpack.Decoder(Message)

    def __init__(self, stream: anyio.abc.ByteStream):
        self.stream = stream
        self._reader = BufferedByteReceiveStream(stream)
        self._lock = anyio.Lock()

    @classmethod
    async def from_socket(cls, sock: socket.socket | int) -> Channel:
        if isinstance(sock, int):
            sock = socket.socket(fileno=sock)
        return cls(SocketBytes(sock))

    async def send(self, message: Message) -> None:
        data = self._encoder.encode(message)
        async with self._lock:
            await self.stream.send(len(data).to_bytes(4, "big") + data)

    async def receive(self) -> Message:
        """The next message; raises ``anyio.EndOfStream`` when the peer is gone."""
        try:
            size = int.from_bytes(await self._reader.receive_exactly(4), "big")
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes is over the {MAX_FRAME} limit")
            return self._decoder.decode(await self._reader.receive_exactly(size))
        except (anyio.IncompleteRead, anyio.BrokenResourceError, anyio.ClosedResourceError):
            raise anyio.EndOfStream from None

    async def aclose(self) -> None:
        await self.stream.aclose()


class ProcessHandle(Protocol):
    """What a scaler knows of a process it started (a ``subprocess.Popen`` fits)."""

    pid: int

    def kill(self) -> None: ...

    def poll(self) -> int | None: ...


def spawn_instance_process(env: dict[str, str] | None = None,
                           warm: list[str] | None = None) -> tuple[subprocess.Popen, socket.socket]:
    """Start a fresh ``python -m flowserve_prewarm_scaler.worker`` process; return it and our
    socket end. With ``warm`` (``executor@device`` names) it is a pre-warmed process: it loads
    the plugins and warms those executors before saying hello."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [sys.executable, "-m", "flowserve_prewarm_scaler.worker", str(theirs.fileno())]
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
                self.info.pid = getattr(hello, "pid", None)
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


async def serve_instance(sock: socket.socket | int, start_path: str = "", warmed: Sequence[str] = ()) -> None:
    """The instance side: say hello, wait for an assignment, build the engine, serve tasks."""
    channel = await Channel.from_socket(sock)
    await channel.send(Hello(pid=os.getpid(), warmed=list(warmed)))
    try:
        assign = await channel.receive()
    except anyio.EndOfStream:
        return  # the server went away before giving us work
    if not isinstance(assign, Assign):
        return

    async def emit(events: list[TokenEvent]) -> None:
        await channel.send(Events(events=events, stats=engine.stats))

    note = ""
    try:
        if assign.attach:
            note = await anyio.to_thread.run_sync(attach_weights, assign.spec, assign.attach)
        elif assign.preload:
            note = await anyio.to_thread.run_sync(preload_model, assign.spec)
        engine = await build_engine(assign.spec, get_plugin_manager(), emit)
    except Exception as exc:
        log.exception("instance failed to start")
        await channel.send(Failed(error=f"{type(exc).__name__}: {exc}"))
        return
    if start_path != "forked" and weights_path(engine.executor) == "preloaded":
        start_path = "ipc" if assign.attach else "preloaded"
    await channel.send(Ready(kv=engine.executor.kv_cache_spec(), start_path=start_path, note=note))
    async with anyio.create_task_group() as tg:

        async def run_engine() -> None:
            await engine.run()
            await channel.send(Failed(error=engine.dead or "engine stopped"))
            tg.cancel_scope.cancel()

        async def heartbeat() -> None:
            try:
                while True:
                    await anyio.sleep(heartbeat_interval(assign.spec))
                    await channel.send(Events(events=[], stats=engine.stats))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # the server is gone; the receive loop below ends too

        tg.start_soon(run_engine)
        tg.start_soon(heartbeat)
        try:
            while True:
                message = await channel.receive()
                if isinstance(message, Submit):
                    engine.submit(message.task)
                elif isinstance(message, Abort):
                    engine.abort(message.task_id)
                elif isinstance(message, Shutdown):
                    break
        except anyio.EndOfStream:
            pass  # the server is gone: so are we
        tg.cancel_scope.cancel()
    if isinstance(engine.executor, ClosableExecutor):
        engine.executor.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point of an instance process: ``python -m flowserve_prewarm_scaler.worker FD
    [--warm EXECUTOR@DEVICE,...]``. With ``--warm`` it loads plugins and warms those executors
    before saying hello (a pre-warmed process), and reports ``prewarmed``."""
    argv = sys.argv[1:] if argv is None else argv
    from flowserve_core.telemetry import setup_logging
    setup_logging(os.environ.get("FLOWSERVE_LOG_LEVEL", "warning"))
    warmed: list[str] = []
    start_path = os.environ.get("FLOWSERVE_START_PATH", "naive")
    if "--warm" in argv:
        warmed = warm_executors([w for w in argv[argv.index("--warm") + 1].split(",") if w])
        start_path = "prewarmed"
    anyio.run(serve_instance, int(argv[0]), start_path, warmed)


if __name__ == "__main__":
    main()
