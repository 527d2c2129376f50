"""A worker rank (1 … N-1) of a tensor-parallel executor.

By default ``gang.WorkerGang`` runs it as ``python -m flowserve_spmd_executor.worker FD``,
where FD is its end of a socketpair. A rank started by another launcher (a Ray actor, see
``launch.py``) calls ``connect_to_rank0`` with its ``ControlAddress`` and then ``serve`` on
the channel. Either way it builds its ``Rank`` from the ``Init`` message, says ``Ready``,
joins the group, then runs what rank 0 announces until ``Shutdown``, end of stream (rank 0
is gone), its parent process changing (rank 0's process died; child processes only), or a
failed collective.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time

from flowserve_core.interfaces import PluginLookup
from flowserve_core.plugins import PluginManager
from flowserve_core.telemetry import setup_logging
from flowserve_spmd_executor.launch import ControlAddress
from flowserve_spmd_executor.protocol import (
    Channel,
    ExportBlocks,
    Failed,
    Hello,
    ImportBlocks,
    Init,
    Ready,
    RunStep,
    Shutdown,
    send_hello,
)

log = logging.getLogger("flowserve_spmd_executor.worker")


def _exit_when_orphaned(parent: int) -> None:
    """Rank 0's process died without closing our socket (e.g. killed): leave too."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(3)


def connect_to_rank0(address: ControlAddress, timeout: float = 60.0) -> Channel:
    """Connect to rank 0's control socket and prove this worker's rank with its token."""
    sock = socket.create_connection((address.host, address.port), timeout=timeout)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    send_hello(sock, Hello(rank=address.rank, token=address.token))
    return Channel(sock)


def serve(channel: Channel, *, plugins: PluginLookup, local_device_index: int | None = None) -> int:
    """Build this rank and run rank 0's announcements; the exit code (0: told to stop or
    rank 0 went away). ``plugins``: this process's manager (the model architectures it
    knows). ``local_device_index``: the accelerator this process was given (its host chose
    it), instead of rank 0's base index plus the rank."""
    init = channel.recv()
    if not isinstance(init, Init):
        return 2
    rank_index = init.setup.rank
    try:
        import msgspec

        from flowserve_spmd_executor.rank import Rank

        setup = init.setup
        if local_device_index is not None and setup.device_type != "cpu":
            setup = msgspec.structs.replace(setup, local_device_index=local_device_index)
        rank = Rank(setup, show_progress=False, plugins=plugins)
        channel.send(Ready(rank=rank_index, load_seconds=rank.load_seconds))
        rank.connect()
        while True:
            message = channel.recv()
            if message is None or isinstance(message, Shutdown):
                break
            if isinstance(message, RunStep):
                rank.run(message.plan)
            elif isinstance(message, ExportBlocks):
                rank.export_blocks(message.block_ids)
            elif isinstance(message, ImportBlocks):
                rank.import_blocks(message.block_ids, None)
        rank.close()
        return 0
    except BaseException as exc:  # tell rank 0 why, whatever it was
        log.exception("tensor-parallel rank %d failed", rank_index)
        try:
            channel.send(Failed(rank=rank_index, error=f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        return 1


def main() -> None:
    """Entry point: ``python -m flowserve_spmd_executor.worker FD``."""
    # the server's log format and level (JSON lines unless on a terminal), as instance processes
    setup_logging(os.environ.get("FLOWSERVE_LOG_LEVEL", "warning"))
    sock = socket.socket(fileno=int(sys.argv[1]))
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    code = serve(Channel(sock), plugins=PluginManager())  # this process's own manager, built once
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: torch's process-group threads may still be blocked.
    os._exit(code)


if __name__ == "__main__":
    main()
