"""What rank 0 and its worker ranks say to each other over one socketpair per worker.

Frames are a 4-byte big-endian length and a msgpack message. Rank 0 sends ``Init`` once,
then a ``RunStep`` (the compact ``StepPlan``), ``ExportBlocks`` or ``ImportBlocks`` before
each collective program it starts, and ``Shutdown`` at the end; the worker answers ``Ready``
after loading, or ``Failed`` with its error before it exits. Tensors never travel here: they
go through the tensor-parallel group's collectives.
"""

from __future__ import annotations

import select
import socket
import struct

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

    def close(self) -> None:
        """Close the socket (the peer reads end of stream)."""
        try:
            self.sock.close()
        except OSError:
            pass
