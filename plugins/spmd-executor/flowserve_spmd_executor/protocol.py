"""What rank 0 and its worker ranks say to each other over one socketpair per worker.

Frames are a 4-byte big-endian length and a msgpack message. Rank 0 sends ``Init`` once,
then a ``RunStep`` (the compact ``StepPlan``), ``ExportBlocks`` or ``ImportBlocks`` before
each collective program it starts, and ``Shutdown`` at the end; the worker answers ``Ready``
after loading, or ``Failed`` with its error before it exits. Tensors never travel here: they
go through the tensor-parallel group's collectives.

A worker that connected over TCP (a rank started elsewhere, see ``launch.py``) first sends
``Hello`` with its rank and token; rank 0 reads it with ``read_hello`` (a small frame within
a few seconds, or the connection is dropped) and says nothing to a peer that fails the check.
"""

from __future__ import annotations

import hmac
import select
import socket
import struct
import time

import msgspec

from flowserve_spmd_executor.plan import StepPlan
from flowserve_spmd_executor.rank import RankSetup

_HEADER = struct.Struct(">I")


class Init(msgspec.Struct, tag=True):
    setup: RankSetup


class Ready(msgspec.Struct, tag=True):
    rank: int
    load_seconds: float


class Failed(msgspec.Struct, tag=True):
    rank: int
    error: str


class RunStep(msgspec.Struct, tag=True):
    plan: StepPlan


class ExportBlocks(msgspec.Struct, tag=True):
    block_ids: list[int]


class ImportBlocks(msgspec.Struct, tag=True):
    block_ids: list[int]


class Shutdown(msgspec.Struct, tag=True):
    pass


class Hello(msgspec.Struct, tag=True):
    """A worker's first frame over TCP: which rank it is and the token rank 0 gave that rank."""

    rank: int
    token: str


_HELLO_LIMIT = 1024


def send_hello(sock: socket.socket, hello: Hello) -> None:
    """Introduce this worker to rank 0 (the first frame on a TCP connection)."""
    body = msgspec.msgpack.encode(hello)
    sock.sendall(_HEADER.pack(len(body)) + body)


def read_hello(sock: socket.socket, timeout: float) -> Hello | None:
    """The ``Hello`` a connecting peer sends first, or None if it sends anything else: a bigger
    frame, garbage, or nothing within ``timeout`` seconds (nothing more is read from it)."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        if len(data) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(data)
            if size > _HELLO_LIMIT:
                return None
            if len(data) >= _HEADER.size + size:
                try:
                    return msgspec.msgpack.decode(data[_HEADER.size:_HEADER.size + size], type=Hello)
                except msgspec.DecodeError:
                    return None
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return None
        try:
            chunk = sock.recv(_HELLO_LIMIT + _HEADER.size - len(data))
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk


def token_matches(given: str, expected: str) -> bool:
    """Compare tokens in constant time."""
    return hmac.compare_digest(given.encode(), expected.encode())


Message = Init | Ready | Failed | RunStep | ExportBlocks | ImportBlocks | Shutdown


class Channel:
    """Framed messages over a connected stream socket (blocking)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Message)
        self._buffer = bytearray()

    def send(self, message: Message) -> None:
        """Send one message (raises ``OSError`` if the peer is gone)."""
        body = self._encoder.encode(message)
        self.sock.sendall(_HEADER.pack(len(body)) + body)

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next message; None at end of stream, ``TimeoutError`` if none came in ``timeout``."""
        while True:
            if len(self._buffer) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(self._buffer)
                if len(self._buffer) >= _HEADER.size + size:
                    body = bytes(self._buffer[_HEADER.size:_HEADER.size + size])
                    del self._buffer[:_HEADER.size + size]
                    return self._decoder.decode(body)
            if timeout is not None and not select.select([self.sock], [], [], timeout)[0]:
                raise TimeoutError("no message")
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self._buffer += chunk

    def peer_closed(self) -> bool:
        """Whether the peer closed its end (end of stream is all that is left to read, or the
        connection was reset). Never blocks and consumes nothing."""
        try:
            if not select.select([self.sock], [], [], 0)[0]:
                return False
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except (ConnectionResetError, ValueError, OSError):
            return True

    def close(self) -> None:
        """Close the socket (the peer reads end of stream)."""
        try:
            self.sock.close()
        except OSError:
            pass
