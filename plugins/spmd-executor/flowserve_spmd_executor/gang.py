"""Rank 0's handle on its worker ranks: start them, announce work, watch them, stop them.

Each worker is a ``python -m flowserve_spmd_executor.worker`` process with one end of a
socketpair (nothing listens on the network except the group's own rendezvous on
127.0.0.1). ``dead_reason`` tells, without blocking, whether a worker exited and why.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time

from flowserve_spmd_executor.protocol import Channel, Failed, Init, Message, Ready, Shutdown
from flowserve_spmd_executor.rank import RankSetup

log = logging.getLogger(__name__)
_NOTHING = object()


class WorkerStartError(RuntimeError):
    """A worker rank failed (or took too long) to load its shard."""


class WorkerGang:
    """The worker processes of ranks 1 … N-1."""

    def __init__(self, setups: list[RankSetup]):
        self.processes: list[subprocess.Popen] = []
        self.channels: list[Channel] = []
        self.ranks = [s.rank for s in setups]
        self._errors: dict[int, str] = {}
        try:
            for setup in setups:
                parent, child = socket.socketpair()
                process = subprocess.Popen(
                    [sys.executable, "-m", "flowserve_spmd_executor.worker", str(child.fileno())],
                    pass_fds=(child.fileno(),), env=dict(os.environ))
                child.close()
                self.processes.append(process)
                self.channels.append(Channel(parent))
                self.channels[-1].send(Init(setup=setup))
        except BaseException:
            self.close()
            raise

    def wait_ready(self, timeout: float) -> list[float]:
        """Wait until every worker loaded its shard; their load times. Raises
        ``WorkerStartError`` with the worker's own error if one fails or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        seconds: dict[int, float] = {}
        while len(seconds) < len(self.ranks):
            for rank, process, channel in zip(self.ranks, self.processes, self.channels):
                if rank in seconds:
                    continue
                try:
                    message = channel.recv(timeout=0.1)
                except TimeoutError:
                    message = _NOTHING
                if isinstance(message, Ready):
                    seconds[rank] = message.load_seconds
                    continue
                if message is not _NOTHING:
                    self._note(rank, message)
                if message is not _NOTHING or process.poll() is not None:
                    reason = self._exit_reason(rank, process) or self._errors.get(rank, "unknown error")
                    raise WorkerStartError(f"tensor-parallel rank {rank} failed while loading: {reason}")
            if time.monotonic() > deadline:
                missing = [r for r in self.ranks if r not in seconds]
                raise WorkerStartError(f"tensor-parallel ranks {missing} did not load within {timeout:.0f} s")
        return [seconds[r] for r in self.ranks]

    def send_all(self, message: Message) -> None:
        """Announce ``message`` to every worker (``OSError`` if one is gone)."""
        for channel in self.channels:
            channel.send(message)

    def _note(self, rank: int, message: object) -> None:
        if isinstance(message, Failed):
            self._errors[rank] = message.error
        elif message is None:
            self._errors.setdefault(rank, "its connection to rank 0 closed")

    def _exit_reason(self, rank: int, process: subprocess.Popen) -> str | None:
        code = process.poll()
        if code is None:
            return None
        error = self._errors.get(rank)
        if error is None:
            try:  # the worker may have said why just before it exited
                self._note(rank, self.channels[self.ranks.index(rank)].recv(timeout=0))
            except (TimeoutError, OSError):
                pass
            error = self._errors.get(rank)
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return f"process {process.pid} {how}" + (f" ({error})" if error else "")

    def dead_reason(self) -> str | None:
        """Why a worker is gone, or None while all run (never blocks)."""
        for rank, process in zip(self.ranks, self.processes):
            reason = self._exit_reason(rank, process)
            if reason:
                return f"tensor-parallel rank {rank} died: {reason}"
        return None

    def close(self, timeout: float = 5.0) -> None:
        """Ask the workers to stop, then kill those still running after ``timeout``."""
        for channel in self.channels:
            try:
                channel.send(Shutdown())
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for channel in self.channels:
            channel.close()
