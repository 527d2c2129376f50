"""The protocol the server speaks with an instance process, and the socket it runs on.

The server and an instance process share one connected Unix socket (a socketpair made by
the scaler; nothing listens on the filesystem or the network). Frames are length-prefixed
msgpack ``Message``s. The instance says ``Hello``, waits for an ``Assign`` (a pre-warmed
process may wait a long time), builds its engine, says ``Ready``, then takes ``Submit`` and
``Abort`` and sends one ``Events`` frame per engine step. When the server's end closes, the
instance exits; when the instance dies, the server fails its tasks. A ready instance also
sends an empty ``Events`` frame (a heartbeat) every ``heartbeat_interval(spec)`` seconds,
from its event loop, which keeps running while a step computes in a thread: so silence
means the process is frozen (SIGSTOP, a stuck interpreter), not that a step is long. A
process that sends nothing for ``heartbeat_timeout(spec)`` seconds (option
``heartbeat_timeout_seconds``, default 5) is killed and its tasks fail, as if it had died.
A step that is merely long is the engine's business: it dies after ``step_timeout_seconds``.

The server's side is ``remote.RemoteInstance``, the instance's side ``worker.serve_instance``.
"""

from __future__ import annotations

import socket

import anyio
import anyio.abc
import msgspec
from anyio.streams.buffered import BufferedByteReceiveStream

from flowserve_core.types import DeploymentSpec, InstanceInfo, InstanceStats, KVCacheSpec, Task, TokenEvent

#: The largest frame either side accepts (a bigger length prefix means a broken stream).
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
    """Run ``task`` on the instance's engine."""

    task: Task


class Abort(msgspec.Struct, tag=True):
    """Abort the task ``task_id`` (its stream was left early)."""

    task_id: str


class Events(msgspec.Struct, tag=True):
    """One engine step's events and the instance's stats (empty events: a heartbeat)."""

    events: list[TokenEvent]
    stats: InstanceStats


class Failed(msgspec.Struct, tag=True):
    """The engine could not start, or it died: ``error`` says why."""

    error: str


class Shutdown(msgspec.Struct, tag=True):
    """End the engine now (the server drained the instance)."""


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
