"""Rank 0's handle on its worker ranks: start them, announce work, watch them, stop them.

The installed ``RankLauncher`` (``launch.py``) starts each worker: by default a child
process holding one end of a socketpair (nothing listens on the network). A launcher whose
ranks may be elsewhere (Ray actors on a placement group) has them connect back: rank 0
listens on the launcher's ``listen_host`` until every worker connected and proved its rank
with the token of its ``ControlAddress``; then the listener closes. ``dead_reason`` tells,
without blocking, whether a worker ended and why.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time

import msgspec

from flowserve_spmd_executor.launch import ControlAddress, RankHandle, RankLauncher, SubprocessHandle, rank_launcher
from flowserve_spmd_executor.protocol import (
    Channel,
    Failed,
    Init,
    Message,
    Ready,
    Shutdown,
    read_hello,
    token_matches,
)
from flowserve_spmd_executor.rank import RankSetup

log = logging.getLogger(__name__)
_NOTHING = object()
_HELLO_TIMEOUT = 5.0


class WorkerStartError(RuntimeError):
    """A worker rank failed (or took too long) to load its shard."""


class WorkerGang:
    """The worker ranks 1 … N-1, started by ``launcher`` (default: the installed one)."""

    def __init__(self, setups: list[RankSetup], launcher: RankLauncher | None = None):
        self.launcher = launcher or rank_launcher()
        self.ranks = [s.rank for s in setups]
        self.handles: list[RankHandle] = []
        #: each rank's control channel; None until a connecting worker proved itself
        self.channels: list[Channel | None] = []
        self._errors: dict[int, str] = {}
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._closed = False
        host = self.launcher.listen_host
        try:
            if host is None:
                for setup in setups:
                    parent, child = socket.socketpair()
                    try:
                        self.handles.append(self.launcher.launch(setup, child))
                    finally:
                        child.close()
                    channel = Channel(parent)
                    self.channels.append(channel)
                    channel.send(Init(setup=setup))
            else:
                setups = [msgspec.structs.replace(s, store_host=host) for s in setups]
                self._listener = socket.create_server((host, 0))
                self._listener.settimeout(0.5)  # to notice ``close`` between connections
                port = self._listener.getsockname()[1]
                tokens = {s.rank: secrets.token_hex(32) for s in setups}
                self.channels = [None] * len(setups)
                self._accepting = threading.Thread(target=self._accept, args=(setups, tokens), daemon=True,
                                                   name="spmd-gang-accept")
                self._accepting.start()
                for setup in setups:
                    self.handles.append(self.launcher.launch(setup, ControlAddress(
                        host=host, port=port, rank=setup.rank, token=tokens[setup.rank])))
        except BaseException:
            self.close()
            raise

    @property
    def processes(self) -> list:
        """The ``subprocess.Popen`` of each worker that is a child process (tests kill them)."""
        return [h.process for h in self.handles if isinstance(h, SubprocessHandle)]

    def _accept(self, setups: list[RankSetup], tokens: dict[int, str]) -> None:
        """Take each worker's connection once it proves its rank; then stop listening."""
        listener = self._listener
        assert listener is not None  # made before this thread starts
        index = {s.rank: i for i, s in enumerate(setups)}
        try:
            while not self._closed and any(c is None for c in self.channels):
                try:
                    conn, peer = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return  # closed
                conn.setblocking(True)
                hello = read_hello(conn, _HELLO_TIMEOUT)
                if (hello is None or hello.rank not in index or self.channels[index[hello.rank]] is not None
                        or not token_matches(hello.token, tokens[hello.rank])):
                    log.warning("refused a connection to tensor-parallel rank 0 from %s: not a worker of "
                                "this gang", peer[0], extra={"peer": peer[0]})
                    conn.close()
                    continue
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                channel = Channel(conn)
                try:
                    channel.send(Init(setup=setups[index[hello.rank]]))
                except OSError:
                    channel.close()
                    continue
                self.channels[index[hello.rank]] = channel
        finally:
            self._stop_listening()

    def _stop_listening(self) -> None:
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass

    def wait_ready(self, timeout: float) -> list[float]:
        """Wait until every worker loaded its shard; their load times. Raises
        ``WorkerStartError`` with the worker's own error if one fails or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        seconds: dict[int, float] = {}
        while len(seconds) < len(self.ranks):
            for i, rank in enumerate(self.ranks):
                if rank in seconds:
                    continue
                channel = self.channels[i]
                message: object = _NOTHING
                if channel is None:
                    time.sleep(0.1 / len(self.ranks))  # not connected yet
                else:
                    try:
                        message = channel.recv(timeout=0.1)
                    except TimeoutError:
                        pass
                if isinstance(message, Ready):
                    seconds[rank] = message.load_seconds
                    continue
                if message is not _NOTHING:
                    self._note(rank, message)
                if message is not _NOTHING or self.handles[i].exit_reason() is not None:
                    reason = self._exit_reason(i) or self._errors.get(rank, "unknown error")
                    raise WorkerStartError(f"tensor-parallel rank {rank} failed while loading: {reason}")
            if time.monotonic() > deadline:
                missing = [r for r in self.ranks if r not in seconds]
                unconnected = [r for r, c in zip(self.ranks, self.channels) if c is None]
                more = f" ({unconnected} never connected to rank 0)" if unconnected else ""
                raise WorkerStartError(f"tensor-parallel ranks {missing} did not load within {timeout:.0f} s{more}")
        return [seconds[r] for r in self.ranks]

    def send_all(self, message: Message) -> None:
        """Announce ``message`` to every worker (``OSError`` if one is gone)."""
        for rank, channel in zip(self.ranks, self.channels):
            if channel is None:
                raise OSError(f"tensor-parallel rank {rank} never connected to rank 0")
            channel.send(message)

    def _note(self, rank: int, message: object) -> None:
        if isinstance(message, Failed):
            self._errors[rank] = message.error
        elif message is None:
            self._errors.setdefault(rank, "its connection to rank 0 closed")

    def _exit_reason(self, i: int) -> str | None:
        rank, handle, channel = self.ranks[i], self.handles[i], self.channels[i]
        reason = handle.exit_reason()
        if reason is None:
            return None
        error = self._errors.get(rank)
        if error is None and channel is not None:
            try:  # the worker may have said why just before it ended
                self._note(rank, channel.recv(timeout=0))
            except (TimeoutError, OSError):
                pass
            error = self._errors.get(rank)
        return reason + (f" ({error})" if error else "")

    def dead_reason(self) -> str | None:
        """Why a worker is gone, or None while all run (never blocks). A worker whose
        connection closed counts as gone even before its launcher noticed it ended (a rank on
        another host: its launcher learns of the end later than the socket does)."""
        for i, rank in enumerate(self.ranks):
            reason = self._exit_reason(i)
            if reason:
                return f"tensor-parallel rank {rank} died: {reason}"
        for rank, handle, channel in zip(self.ranks, self.handles, self.channels):
            if channel is not None and channel.peer_closed():
                return f"tensor-parallel rank {rank} died: its connection to rank 0 closed ({handle})"
        return None

    def close(self, timeout: float = 5.0) -> None:
        """Ask the workers to stop, then end those still running after ``timeout``."""
        self._closed = True
        self._stop_listening()
        for channel in self.channels:
            if channel is None:
                continue
            try:
                channel.send(Shutdown())
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for handle in self.handles:
            try:
                handle.stop(max(0.0, deadline - time.monotonic()))
            except Exception:  # stopping one must not keep the others running
                log.exception("could not stop a tensor-parallel rank (%s)", handle)
        for channel in self.channels:
            if channel is not None:
                channel.close()
