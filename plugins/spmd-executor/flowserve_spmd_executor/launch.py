"""How rank 0 starts its worker ranks: the ``RankLauncher`` seam.

By default each worker rank is a child process (``SubprocessLauncher``): ``python -m
flowserve_spmd_executor.worker FD`` with one end of a socketpair, and the group's
rendezvous listens on 127.0.0.1 only. A host process that places ranks itself (the Ray
scaler's engine actor starts them as actors on a placement group's bundles) installs its own
launcher with ``use_rank_launcher`` before it builds the executor. Launchers are objects a
host installs in code, never names read from a config or a request.

A launcher whose ranks may run on another host sets ``listen_host`` to the address of this
host they can reach: the rendezvous store, the ranks' gloo connections and rank 0's control
socket then listen there, and each worker proves it belongs to the gang with the random
token of its ``ControlAddress`` before rank 0 tells it anything.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import TYPE_CHECKING, Protocol

import msgspec

if TYPE_CHECKING:
    from flowserve_spmd_executor.rank import RankSetup

LOOPBACK = "127.0.0.1"


class ControlAddress(msgspec.Struct, kw_only=True):
    """Where a worker rank started elsewhere reaches rank 0, and the secret it proves itself with."""

    host: str
    port: int
    rank: int
    token: str


class RankHandle(Protocol):
    """Rank 0's handle on one worker rank it launched."""

    def exit_reason(self) -> str | None:
        """Why the rank ended ("process 12 was killed by signal 9"), or None while it runs.
        Never blocks."""

    def stop(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the rank to end by itself (it was told to), then
        end it by force and release what it holds."""


class RankLauncher(Protocol):
    """Starts worker ranks (1 … N-1) of a tensor-parallel executor."""

    #: None: ranks run on this host and are reached through an inherited socket (``launch``
    #: gets the worker's end of a socketpair); else the address of this host the ranks
    #: connect to (``launch`` gets a ``ControlAddress``)
    listen_host: str | None

    def launch(self, setup: RankSetup, link: socket.socket | ControlAddress) -> RankHandle:
        """Start the worker of ``setup.rank``; it talks to rank 0 over ``link``."""


class SubprocessHandle:
    """A worker rank that is a child process of rank 0's."""

    def __init__(self, process: subprocess.Popen):
        self.process = process

    def exit_reason(self) -> str | None:
        code = self.process.poll()
        if code is None:
            return None
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return f"process {self.process.pid} {how}"

    def stop(self, timeout: float) -> None:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __str__(self) -> str:
        return f"process {self.process.pid}"


class SubprocessLauncher:
    """Worker ranks as ``python -m flowserve_spmd_executor.worker FD`` child processes."""

    listen_host: str | None = None

    def launch(self, setup: RankSetup, link: socket.socket | ControlAddress) -> SubprocessHandle:
        if not isinstance(link, socket.socket):
            raise TypeError("SubprocessLauncher hands its workers an inherited socket")
        process = subprocess.Popen(
            [sys.executable, "-m", "flowserve_spmd_executor.worker", str(link.fileno())],
            pass_fds=(link.fileno(),), env=dict(os.environ))
        return SubprocessHandle(process)


_launcher: RankLauncher = SubprocessLauncher()


def use_rank_launcher(launcher: RankLauncher | None) -> RankLauncher:
    """Make ``launcher`` start the worker ranks of the executors built from now on in this
    process (None: back to child processes); the launcher it replaces."""
    global _launcher
    previous, _launcher = _launcher, launcher or SubprocessLauncher()
    return previous


def rank_launcher() -> RankLauncher:
    """The launcher executors built now use."""
    return _launcher


def local_address_towards(host: str) -> str:
    """This host's address on the route to ``host`` (the interface peers there can reach;
    127.0.0.1 for a loopback ``host``). Sends nothing."""
    if host.startswith("127.") or host == "localhost":
        return LOOPBACK
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))  # UDP connect only picks the route
        return probe.getsockname()[0]
