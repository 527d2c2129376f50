"""The instance process: an engine instance serving the server over ``protocol``'s socket.

``main`` is the process's entry point and its composition root: it builds the process's
plugin manager once (``PluginManager()`` reads the same allow and block variables as the
server, so both load the same plugins) and hands it to what needs it. ``serve_instance`` is
the instance's side of the protocol; a zygote's forked children (flowserve-prewarm-scaler)
run it too, with the manager they inherited.

Run an instance process with ``python -m flowserve_instance_runtime.worker FD``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Sequence

import anyio

from flowserve_core.engine import build_engine
from flowserve_core.interfaces import ClosableExecutor
from flowserve_core.plugins import PluginManager
from flowserve_core.types import TokenEvent
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
    heartbeat_interval,
)
from flowserve_instance_runtime.startup import attach_weights, preload_model, warm_executors, weights_path

log = logging.getLogger(__name__)


async def serve_instance(sock: socket.socket | int, pm: PluginManager, start_path: str = "",
                         warmed: Sequence[str] = ()) -> None:
    """The instance side: say hello, wait for an assignment, build the engine with the
    components of ``pm``, serve tasks."""
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
            note = await anyio.to_thread.run_sync(attach_weights, pm, assign.spec, assign.attach)
        elif assign.preload:
            note = await anyio.to_thread.run_sync(preload_model, pm, assign.spec)
        engine = await build_engine(assign.spec, pm, emit)
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
    """Entry point of an instance process: ``python -m flowserve_instance_runtime.worker FD
    [--warm EXECUTOR@DEVICE,...]``. It builds the process's plugin manager (its composition
    root) before saying hello. With ``--warm`` it also warms those executors (a pre-warmed
    process), and reports ``prewarmed``."""
    argv = sys.argv[1:] if argv is None else argv
    from flowserve_core.telemetry import setup_logging
    setup_logging(os.environ.get("FLOWSERVE_LOG_LEVEL", "warning"))
    pm = PluginManager()
    warmed: list[str] = []
    start_path = os.environ.get("FLOWSERVE_START_PATH", "naive")
    if "--warm" in argv:
        warmed = warm_executors(pm, [w for w in argv[argv.index("--warm") + 1].split(",") if w])
        start_path = "prewarmed"
    anyio.run(serve_instance, int(argv[0]), pm, start_path, warmed)


if __name__ == "__main__":
    main()
