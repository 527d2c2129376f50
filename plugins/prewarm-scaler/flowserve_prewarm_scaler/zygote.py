"""Fork-clone (the CPU analogue of NPU-fork): a zygote process holds a model loaded and forks
new instance processes, which serve at once, sharing the zygote's weight pages copy-on-write.

The zygote is its own process, started fresh (never forked from the server), with no event
loop and no threads, and it never computes. That matters: a process that has run a torch CPU
parallel region (GNU OpenMP) and then forks gets children that hang on their first parallel
op, because the OpenMP thread pool it made does not exist in the child. So the zygote sets
torch to one intra-op thread (parallel loops then run inline, no OpenMP team is created),
maps the model's DRAM image (``preload`` of the executor factory; building the image, which
computes, happens in another process) and waits. Each child sets the thread count back to
the machine's default before it builds its engine.

Protocol on the zygote's socketpair (length-prefixed msgpack, blocking on the zygote side):
``Preload(spec)`` → ``Preloaded(seconds, error)``; ``Fork`` with one socket passed along
(SCM_RIGHTS) → ``Forked(pid)``: the child serves that socket with the instance runtime's
``serve_instance``, as an instance process does. The zygote's ``main`` builds the process's
plugin manager once; the preload steps use it and the children inherit it.
The zygote exits when the server's end closes; its children are reaped as they exit,
and the server watches each child through a pidfd.

Run it with ``python -m flowserve_prewarm_scaler.zygote FD``.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import anyio
import anyio.abc
import msgspec

from flowserve_core.plugins import PluginManager
from flowserve_core.types import DeploymentSpec

log = logging.getLogger(__name__)


class Preload(msgspec.Struct, tag=True):
    """Load (map) ``spec``'s model in the zygote so that children inherit it."""

    spec: DeploymentSpec


class Preloaded(msgspec.Struct, tag=True):
    """The model is mapped (``error`` empty), or why not. On a device (CUDA, NPU) the zygote
    cannot fork; it holds the model there instead and ``handles`` are its weights' IPC
    handles, for new instances to attach."""

    seconds: float
    error: str = ""
    handles: bytes = b""


class Fork(msgspec.Struct, tag=True):
    """Fork a child that serves the socket passed with this message."""


class Forked(msgspec.Struct, tag=True):
    pid: int


ZygoteMessage = Preload | Preloaded | Fork | Forked
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ZygoteMessage)


def _recv_exactly(sock: socket.socket, size: int, fds: list[int]) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk, got, _, _ = socket.recv_fds(sock, size - len(data), 4)
        fds.extend(got)
        if not chunk:
            return None
        data += chunk
    return data


def _serve_zygote(sock: socket.socket, pm: PluginManager) -> None:
    """The zygote's loop: blocking, single-threaded, until the server closes its end."""
    import torch

    from flowserve_instance_runtime import preload_model, share_weights, warm_executors

    child_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no OpenMP team before forking (see the module docstring)
    signal.signal(signal.SIGCHLD, _reap_children)
    warmed: list[str] = []
    while True:
        fds: list[int] = []
        header = _recv_exactly(sock, 4, fds)
        body = header and _recv_exactly(sock, int.from_bytes(header, "big"), fds)
        if not body:
            return
        message = _decoder.decode(body)
        if isinstance(message, Preload):
            started = time.perf_counter()
            spec = message.spec
            # Building an image runs a subprocess, which must reap its own child.
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            warmed = warm_executors(pm, [f"{spec.executor}@{spec.device}"])
            error, handles = preload_model(pm, spec), b""
            if error:
                handles, error = share_weights(pm, spec, error)
            signal.signal(signal.SIGCHLD, _reap_children)
            # Everything alive now is inherited: keep the children's garbage collector off it,
            # or its first full pass writes to (and so copies) every page of the heap.
            gc.freeze()
            reply: ZygoteMessage = Preloaded(seconds=time.perf_counter() - started, error=error,
                                             handles=handles)
        elif isinstance(message, Fork):
            (fd,) = fds
            pid = os.fork()
            if pid == 0:
                sock.close()
                _run_child(fd, pm, child_threads, warmed)  # never returns
            os.close(fd)
            reply = Forked(pid=pid)
        else:
            continue
        data = _encoder.encode(reply)
        sock.sendall(len(data).to_bytes(4, "big") + data)


def _reap_children(signum: int = 0, frame: Any = None) -> None:
    """Collect exited children so none stays a zombie (the server watches them by pidfd)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _run_child(fd: int, pm: PluginManager, threads: int, warmed: list[str]) -> None:
    """A forked instance: restore torch's threads, serve ``fd``, exit without teardown."""
    code = 0
    try:
        import torch

        from flowserve_instance_runtime.worker import serve_instance

        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        torch.set_num_threads(threads)
        anyio.run(serve_instance, fd, pm, "forked", warmed)
    except BaseException:
        log.exception("forked instance failed")
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m flowserve_prewarm_scaler.zygote FD``."""
    argv = sys.argv[1:] if argv is None else argv
    from flowserve_core.telemetry import setup_logging
    setup_logging(os.environ.get("FLOWSERVE_LOG_LEVEL", "warning"))
    sock = socket.socket(fileno=int(argv[0]))
    _serve_zygote(sock, PluginManager())
    os._exit(0)


class ForkedProcess:
    """A forked instance process (a child of the zygote, not of us), watched via a pidfd."""

    def __init__(self, pid: int):
        self.pid = pid
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None  # already gone

    def poll(self) -> int | None:
        """None while it runs, else 0 (its exit status belongs to the zygote)."""
        if self._pidfd is None:
            return 0
        import select

        readable, _, _ = select.select([self._pidfd], [], [], 0)
        if readable:
            os.close(self._pidfd)
            self._pidfd = None
            return 0
        return None

    def kill(self) -> None:
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Zygote:
    """The server's handle on one zygote process: ``preload(spec)`` once, then ``fork()``."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.process = subprocess.Popen([sys.executable, "-m", "flowserve_prewarm_scaler.zygote",
                                         str(theirs.fileno())], pass_fds=[theirs.fileno()])
        theirs.close()
        self._sock = ours
        self._stream: anyio.abc.UNIXSocketStream | None = None
        self._lock = anyio.Lock()
        self.preload_seconds: float | None = None
        self.error = ""
        #: IPC handles of the model held on a device (then instances attach, never fork)
        self.handles = b""

    @property
    def pid(self) -> int:
        return self.process.pid

    async def _request(self, message: ZygoteMessage, fd: int | None = None) -> ZygoteMessage:
        async with self._lock:
            if self._stream is None:
                self._stream = await anyio.abc.UNIXSocketStream.from_socket(self._sock)
            stream = self._stream
            data = _encoder.encode(message)
            frame = len(data).to_bytes(4, "big") + data
            if fd is None:
                await stream.send(frame)
            else:
                await stream.send_fds(frame, [fd])
            header = await self._receive_exactly(stream, 4)
            return _decoder.decode(await self._receive_exactly(stream, int.from_bytes(header, "big")))

    async def _receive_exactly(self, stream: anyio.abc.UNIXSocketStream, size: int) -> bytes:
        data = b""
        while len(data) < size:
            try:
                data += await stream.receive(size - len(data))
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                raise RuntimeError(f"zygote process {self.pid} is gone "
                                   f"(exit code {self.process.poll()})") from None
        return data

    async def preload(self, spec: DeploymentSpec) -> bool:
        """Map ``spec``'s model in the zygote; False (``error`` says why) when it cannot."""
        reply = await self._request(Preload(spec=spec))
        assert isinstance(reply, Preloaded)
        self.error, self.handles = reply.error, reply.handles
        self.preload_seconds = reply.seconds
        return not reply.error

    async def fork(self) -> tuple[ForkedProcess, socket.socket]:
        """A new instance process forked from the zygote, and our end of its socket."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            reply = await self._request(Fork(), fd=theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        assert isinstance(reply, Forked)
        return ForkedProcess(reply.pid), ours

    async def aclose(self) -> None:
        """Close our end (the zygote exits); children keep serving until their sockets close."""
        if self._stream is not None:
            await self._stream.aclose()
        else:
            self._sock.close()
        with anyio.move_on_after(5):
            while self.process.poll() is None:
                await anyio.sleep(0.05)
        if self.process.poll() is None:
            self.process.kill()


if __name__ == "__main__":
    main()
