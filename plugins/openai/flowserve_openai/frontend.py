"""The ``openai`` frontend: ``build_app(server)`` served by uvicorn inside the server's event loop.

It refuses to start with ``/admin`` open to the network (no key, a non-loopback address)
unless ``insecure_admin`` says so, and guards connections with a header deadline and a cap
(``connections.py``).

On SIGTERM or SIGINT uvicorn stops accepting connections and lets in-flight requests finish
(for up to ``drain_timeout`` seconds); then ``serve`` returns and the kernel drains the
deployments. Unlike plain uvicorn, the signal is not raised again afterwards, so the
process ends with status 0 once the shutdown is done.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import socket
import threading
from typing import TYPE_CHECKING, Iterator

import uvicorn

from flowserve_core.config import ServerConfig
from flowserve_core.errors import ConfigError, FlowServeError
from flowserve_openai.app import build_app
from flowserve_openai.connections import guarded_protocol
from flowserve_openai.names import check_server_names

if TYPE_CHECKING:
    from flowserve_core.server import Server

log = logging.getLogger(__name__)

#: How long an idle keep-alive connection stays open. Longer than the clients' own idle expiry
#: (httpx and the openai client: 5 s, uvicorn's default too), so the client always closes
#: first: a server closing at the same moment as a client reuses the connection resets that
#: request (seen as dropped requests at 150 requests/s).
KEEP_ALIVE_SECONDS = 65


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, minus re-raising the shutdown signal once it has stopped."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Turn SIGINT/SIGTERM into a graceful exit while serving; restore the old handlers after."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def check_admin_exposure(config: ServerConfig) -> None:
    """``ConfigError`` when ``/admin`` (which loads any local file as a model) would be open to
    the network: no ``api_key`` or ``admin_key``, an address other than loopback, and no
    ``insecure_admin``. Loopback stays open, as before."""
    if config.api_key or config.admin_key or config.insecure_admin or _is_loopback(config.host):
        return
    raise ConfigError(
        f"refusing to serve on {config.host} with no API or admin key: anyone who can reach it could "
        "call /admin (add and remove models, which loads any file this server can read, and scale "
        "them). Set --api-key (or api_key / admin_key in the config file), bind to 127.0.0.1, or "
        "pass --insecure-admin if the network is trusted")


def _is_loopback(host: str) -> bool:
    """Whether every address ``host`` stands for is a loopback one (unresolvable: left to bind)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return True  # bind() reports it, with the reason
    return all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address of ``host`` on ``port`` (port 0: one free port for all),
    or an error that says why not."""
    try:
        infos = list(dict.fromkeys(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)))
    except OSError as exc:
        raise FlowServeError(f"cannot listen on {host}:{port}: {exc}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            if sockets:  # the same port on every address, also when the first was chosen freely
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise FlowServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sockets


class OpenAIFrontend:
    """Serves a ``Server``'s deployments with the OpenAI API on ``config.host:config.port``."""

    def __init__(self, config: ServerConfig):
        # Both before any deployment starts: the server stops with the reason instead
        check_server_names(config.deployments, config.aliases)
        check_admin_exposure(config)
        self.config = config

    async def serve(self, server: Server) -> None:
        """Run uvicorn in the current event loop until a shutdown signal; then return."""
        config = self.config
        sockets = bind(config.host, config.port)
        uv = _Uvicorn(uvicorn.Config(
            build_app(server), log_config=None, lifespan="on", access_log=True,
            http=guarded_protocol(config.header_timeout, config.max_connections),
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
            # uvicorn annotates an int but waits with asyncio.timeout, which takes seconds as a float
            timeout_graceful_shutdown=max(0.0, config.drain_timeout)))  # type: ignore[arg-type]  # see above
        for sock in sockets:
            host, port = sock.getsockname()[:2]
            log.info("serving the OpenAI API on http://%s:%d", f"[{host}]" if ":" in host else host, port,
                     extra={"host": host, "port": port})
        await uv.serve(sockets=sockets)
