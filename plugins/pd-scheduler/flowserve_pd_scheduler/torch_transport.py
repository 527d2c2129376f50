"""KV transport ``torch-dist``: a prefill's KV bytes sent point to point with
``torch.distributed`` send/recv (gloo on CPU; nccl on CUDA, hccl on Ascend NPUs).

Instances come and go, so there is no one world-sized process group. Each publishing
process runs a ``TCPStore`` (its rendezvous, on ``kv_transport_host``, a free port) and one
daemon thread that serves fetches in order. ``publish`` keeps the bytes (as a tensor on the
transport's device) under a fresh id; the locator is ``torch-dist://HOST:PORT/ID``.
``fetch`` connects to that store, files a request (an atomic counter names it), and the two
sides build a two-rank process group for that one transfer (sender rank 0, receiver rank 1)
whose ``recv`` lands straight in the receiver's buffer: no pickling, no copy through a pipe.
The publisher drops the bytes once sent; ``release`` from any process (the decode side, or
the job scheduler after a failure) drops them too, and unfetched bytes expire after
``kv_transport_ttl`` seconds.

Batch schedulers call ``fetch`` and ``release`` from worker threads (a fetch blocks for the
transfer), several at once: fetches from one publisher take turns (it serves them in order
anyway, and two of them interleaving on one store connection could each wait on the other),
and each fetch talks to the publisher's store on a connection of its own.

Options (``DeploymentSpec.options``): ``kv_transport_backend`` (``gloo`` | ``nccl`` | ``hccl``;
default: by ``spec.device``), ``kv_transport_host`` (default ``$FLOWSERVE_KV_HOST`` or
127.0.0.1; set a routable address for decode instances on other hosts),
``kv_transport_timeout`` (seconds, default 60), ``kv_transport_ttl`` (seconds, default 600).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import threading
import time
import uuid
from typing import Any

from flowserve_core.errors import ConfigError
from flowserve_core.types import DeploymentSpec, KVHandoff

log = logging.getLogger(__name__)

_LOCATOR = re.compile(r"^torch-dist://(?P<host>[A-Za-z0-9.\-:\[\]]+):(?P<port>\d+)/(?P<id>[0-9a-f]{32})$")
BACKENDS = ("gloo", "nccl", "hccl")


class KVHandoffMissing(KeyError):
    """The publisher no longer holds the handoff (sent, released, expired, or it died)."""


def default_backend(device: str) -> str:
    """The collective library for a device: nccl on CUDA, hccl on NPU, gloo on CPU."""
    if device.startswith("cuda"):
        return "nccl"
    if device.startswith("npu"):
        return "hccl"
    return "gloo"


def parse_locator(locator: str) -> tuple[str, int, str]:
    """``(host, port, id)`` of a ``torch-dist://`` locator; a clear error for anything else."""
    match = _LOCATOR.match(locator)
    if match is None:
        raise ValueError(f"not a torch-dist KV locator: {locator!r} (expected torch-dist://HOST:PORT/ID)")
    return match["host"].strip("[]"), int(match["port"]), match["id"]


class TorchDistributedTransport:
    """``interfaces.KVTransport`` over torch.distributed point-to-point (module docstring)."""

    def __init__(self, spec: DeploymentSpec | None = None):
        options = spec.options if spec is not None else {}
        device = spec.device if spec is not None else "cpu"
        self.backend = str(options.get("kv_transport_backend", "") or default_backend(device))
        if self.backend not in BACKENDS:
            raise ConfigError(f"option kv_transport_backend must be one of {', '.join(BACKENDS)}, "
                              f"got {self.backend!r}")
        self.device = device if self.backend != "gloo" else "cpu"
        self.host = str(options.get("kv_transport_host", "") or os.environ.get("FLOWSERVE_KV_HOST", "127.0.0.1"))
        self.timeout = datetime.timedelta(seconds=float(options.get("kv_transport_timeout", 60)))
        self.ttl = float(options.get("kv_transport_ttl", 600))
        self._held: dict[str, tuple[Any, float]] = {}  # id → (uint8 tensor, expiry)
        self._lock = threading.Lock()
        self._store: Any = None
        self._clients: dict[tuple[str, int], Any] = {}
        self._turns: dict[tuple[str, int], threading.Lock] = {}  # one fetch at a time per publisher
        self._server: threading.Thread | None = None
        self._closing = False

    # ------------------------------------------------------------------ publisher side

    def publish(self, data: bytes | memoryview, key: str) -> str:
        """Hold ``data`` for one fetch; the locator names this process's store and the id."""
        import torch

        store = self._serving_store()
        buffer = memoryview(data).cast("B")
        tensor = torch.frombuffer(bytearray(buffer), dtype=torch.uint8) if buffer.nbytes else \
            torch.empty(0, dtype=torch.uint8)
        if self.device != "cpu":
            tensor = tensor.to(self.device)
        transfer = uuid.uuid4().hex
        with self._lock:
            self._expire()
            self._held[transfer] = (tensor, time.monotonic() + self.ttl)
        log.debug("KV handoff %s published for %s (%d bytes)", transfer, key, buffer.nbytes)
        return f"torch-dist://{self.host}:{store.port}/{transfer}"

    def _serving_store(self) -> Any:
        if self._store is None:
            import torch.distributed as dist

            self._store = dist.TCPStore(self.host, 0, is_master=True, wait_for_workers=False, timeout=self.timeout)
            self._server = threading.Thread(target=self._serve, name="flowserve-kv-torch-dist", daemon=True)
            self._server.start()
        return self._store

    def _serve(self) -> None:
        """Answer fetch and release requests in the order they were queued."""
        import torch.distributed as dist

        store = self._store
        requests = store.clone()  # its own connection: a blocking pop must not hold up the rest
        requests.set_timeout(datetime.timedelta(days=1))  # idle waits that expire log c10d warnings
        while True:
            try:
                request = requests.queue_pop("requests").decode()
            except Exception:  # a day without requests, or the store is gone
                if self._closing:
                    return
                continue
            kind, _, rest = request.partition(":")
            if kind == "close":
                return
            number, _, transfer = rest.partition(":")
            with self._lock:
                self._expire()
                held = self._held.pop(transfer, None)
            if kind == "release":
                continue
            if held is None:
                store.set(f"status/{number}", "missing")
                continue
            store.set(f"status/{number}", "ok")
            try:
                group = _process_group(self.backend, dist.PrefixStore(f"group/{number}/", store), 0, self.timeout)
                group.send([held[0]], 1, 0).wait()
            except Exception as exc:  # the receiver went away: its decode recomputes
                log.warning("KV handoff %s could not be sent: %s", transfer, exc)

    def _expire(self) -> None:
        now = time.monotonic()
        for transfer in [t for t, (_, expiry) in self._held.items() if expiry < now]:
            del self._held[transfer]
            log.warning("KV handoff %s expired unfetched after %g s", transfer, self.ttl)

    # ------------------------------------------------------------------ receiver side

    def fetch(self, handoff: KVHandoff) -> memoryview:
        """Receive the handoff's bytes from its publisher (blocks for the transfer)."""
        host, port, transfer = parse_locator(handoff.locator)
        with self._lock:
            turn = self._turns.setdefault((host, port), threading.Lock())
        with turn:
            return self._fetch(handoff, host, port, transfer)

    def _fetch(self, handoff: KVHandoff, host: str, port: int, transfer: str) -> memoryview:
        import torch
        import torch.distributed as dist

        try:
            store = self._client(host, port).clone()  # its own connection: releases never wait on it
            number = store.add("fetches", 1)
            store.queue_push("requests", f"fetch:{number}:{transfer}")
        except Exception as exc:
            self._clients.pop((host, port), None)
            raise KVHandoffMissing(f"the publisher of KV handoff {handoff.locator} is unreachable: {exc}") from None
        store.wait([f"status/{number}"], self.timeout)
        if store.get(f"status/{number}") != b"ok":
            raise KVHandoffMissing(f"KV handoff {handoff.locator} is no longer held by its publisher "
                                   f"(fetched, released or expired)")
        buffer = torch.empty(handoff.nbytes, dtype=torch.uint8, device=self.device)
        group = _process_group(self.backend, dist.PrefixStore(f"group/{number}/", store), 1, self.timeout)
        group.recv([buffer], 0, 0).wait()
        if self.device != "cpu":
            buffer = buffer.cpu()
        return buffer.numpy().data.cast("B")

    def release(self, locator: str) -> None:
        """Drop the handoff wherever it is held (a no-op once it was sent)."""
        host, port, transfer = parse_locator(locator)
        if self._store is not None and port == self._store.port:
            with self._lock:
                if self._held.pop(transfer, None) is not None:
                    return
        try:
            store = self._client(host, port)
            store.queue_push("requests", f"release:0:{transfer}")
        except Exception as exc:  # the publisher is gone, and its bytes with it
            log.debug("KV handoff %s: publisher unreachable on release (%s)", locator, exc)

    def _client(self, host: str, port: int) -> Any:
        import torch.distributed as dist

        with self._lock:
            client = self._clients.get((host, port))
        if client is None:  # connecting may take up to the timeout: not under the lock
            client = dist.TCPStore(host, port, is_master=False, timeout=self.timeout)
            with self._lock:
                client = self._clients.setdefault((host, port), client)
        return client

    def close(self) -> None:
        """Stop serving (held handoffs are dropped)."""
        if self._server is not None and self._server.is_alive():
            self._closing = True
            self._store.queue_push("requests", "close:")
            self._server.join(timeout=5)
        with self._lock:
            self._held.clear()


def _process_group(backend: str, store: Any, rank: int, timeout: datetime.timedelta) -> Any:
    """A two-rank process group of ``backend`` over ``store`` (built directly: no global state)."""
    import torch.distributed as dist

    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, 2, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    try:
        from torch_npu._C._distributed_c10d import ProcessGroupHCCL
    except ImportError:
        raise ConfigError("KV transport backend 'hccl' needs torch-npu (pip install torch-npu)") from None
    options = ProcessGroupHCCL.Options()
    options._timeout = timeout
    return ProcessGroupHCCL(store, rank, 2, options)
