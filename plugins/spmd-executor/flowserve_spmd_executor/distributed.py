"""Process groups for tensor parallelism: one object per rank with the three collectives the
model needs (all-reduce, all-gather, broadcast), each bounded by a timeout.

Backend by device: ``gloo`` on CPU, ``nccl`` on CUDA, ``hccl`` on Ascend NPUs (torch-npu).
On CPU the group is a private ``ProcessGroupGloo`` built from its own store, so one process
may host several tensor-parallel executors without touching torch's global default group.
NCCL and HCCL go through ``torch.distributed.init_process_group`` (one tensor-parallel
executor per process on those devices). Every collective failure — a peer that died, a
timeout — surfaces as ``CollectiveError``, which the executor turns into ``EngineDeadError``.
"""

from __future__ import annotations

import abc
import datetime
import socket
import uuid

import torch
import torch.distributed as dist

from flowserve_spmd_executor.launch import LOOPBACK, local_address_towards, rank_launcher

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


class CollectiveError(RuntimeError):
    """A collective failed: a peer rank died or did not answer within the timeout."""


class TensorParallelGroup:
    """This rank's view of its tensor-parallel group. The layers keep it from construction
    (they need ``rank`` and ``world_size`` to shard); ``connect`` joins the other ranks
    before the first forward pass. With one rank every op is the identity."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank = rank
        self.world_size = world_size
        self._backend: _Backend | None = None

    def connect(self, device_type: str, *, port: int, name: str, timeout: float, join_timeout: float,
                store: dist.Store | None = None, device: torch.device | None = None,
                host: str = LOOPBACK) -> None:
        """Join the group ``name`` whose store listens on ``host``:``port`` (blocks until every
        rank joined, or ``join_timeout``); each collective afterwards fails after ``timeout``
        seconds without its peers."""
        if self.world_size > 1:
            self._backend = _connect(device_type, self.rank, self.world_size, host=host, port=port, name=name,
                                     timeout=timeout, join_timeout=join_timeout, store=store, device=device)

    def _joined(self) -> _Backend:
        if self._backend is None:
            raise CollectiveError(f"rank {self.rank} has not joined its tensor-parallel group")
        return self._backend

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        return tensor if self.world_size == 1 else self._joined().all_reduce(tensor)

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along ``dim`` (rank order)."""
        return tensor if self.world_size == 1 else self._joined().all_gather(tensor, dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` with rank ``src``'s, in place; returns it."""
        return tensor if self.world_size == 1 else self._joined().broadcast(tensor, src)

    def close(self) -> None:
        """Release the group's connections."""
        if self._backend is not None:
            self._backend.close()
            self._backend = None


class _Backend(abc.ABC):
    rank: int
    world_size: int

    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor: ...

    @abc.abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def _gather_parts(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [torch.empty_like(tensor) for _ in range(self.world_size)]


class _GlooGroup(_Backend):
    """A private gloo group (CPU): calls the ProcessGroup object directly."""

    def __init__(self, pg: dist.ProcessGroup, store: dist.Store, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self._pg = pg
        self._store = store  # keeps the rendezvous alive as long as the group

    def _wait(self, what: str, work: dist.Work) -> None:
        try:
            work.wait()
        except RuntimeError as exc:
            raise CollectiveError(f"tensor-parallel {what} failed on rank {self.rank}: {exc}") from exc

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self._wait("all_reduce", self._pg.allreduce([tensor]))
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        tensor = tensor.contiguous()
        parts = self._gather_parts(tensor)
        self._wait("all_gather", self._pg.allgather([parts], [tensor]))
        return torch.cat(parts, dim=dim)

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self._wait("broadcast", self._pg.broadcast([tensor], opts))
        return tensor

    def close(self) -> None:
        self._pg = None  # type: ignore[assignment]  # closed: a later collective fails loudly


class _WorldGroup(_Backend):
    """The default process group (NCCL, HCCL), through torch.distributed's functions."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def _run(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except (RuntimeError, dist.DistError) as exc:
            raise CollectiveError(f"tensor-parallel {what} failed on rank {self.rank}: {exc}") from exc

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self._run("all_reduce", dist.all_reduce, tensor)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        tensor = tensor.contiguous()
        parts = self._gather_parts(tensor)
        self._run("all_gather", dist.all_gather, parts, tensor)
        return torch.cat(parts, dim=dim)

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self._run("broadcast", dist.broadcast, tensor, src)
        return tensor

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class Rendezvous:
    """Rank 0's TCP store on ``host`` (port chosen by the OS); workers connect to ``host``:``port``.
    ``host`` defaults to 127.0.0.1, or the installed rank launcher's ``listen_host``."""

    def __init__(self, world_size: int, timeout: float, host: str | None = None):
        self.world_size = world_size
        self.name = f"flowserve-tp-{uuid.uuid4().hex[:12]}"
        self.host = host or rank_launcher().listen_host or LOOPBACK
        # torch's TCPStore server binds every interface when it opens its own socket: hand it
        # one bound to ``host`` only.
        self._listener = socket.create_server((self.host, 0))
        self.port = self._listener.getsockname()[1]
        self.store = dist.TCPStore(self.host, self.port, world_size, is_master=True,
                                   timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False,
                                   master_listen_fd=self._listener.fileno())


def _connect(device_type: str, rank: int, world_size: int, *, host: str, port: int, name: str, timeout: float,
             join_timeout: float, store: dist.Store | None, device: torch.device | None) -> _Backend:
    delta = datetime.timedelta(seconds=timeout)
    backend = BACKENDS[device_type]
    try:
        if store is None:
            store = dist.TCPStore(host, port, world_size, is_master=False,
                                  timeout=datetime.timedelta(seconds=join_timeout))
        prefixed = dist.PrefixStore(name, store)
        if backend == "gloo":
            # The private _Options is the only way to choose gloo's device and thread count.
            options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # absent from torch's stubs
            # Listen where the other ranks reach this one, not on whatever the hostname means.
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_address_towards(host))]
            options._timeout = delta
            options._threads = 2
            pg = dist.ProcessGroupGloo(prefixed, rank, world_size, options)
            return _GlooGroup(pg, store, rank, world_size)  # type: ignore[arg-type]  # stubs lack gloo's collectives
        if backend == "hccl":
            import torch_npu  # noqa: F401  (registers the hccl backend)
        if dist.is_initialized():
            raise CollectiveError(f"torch.distributed is already initialised in this process; the "
                                  f"spmd executor needs its own {backend} group (one tensor-parallel "
                                  "executor per process on accelerators)")
        dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world_size,
                                timeout=delta, device_id=device)
        return _WorldGroup(rank, world_size)
    except CollectiveError:
        raise
    except (RuntimeError, dist.DistError) as exc:
        raise CollectiveError(f"rank {rank} could not join the {backend} group: {exc}") from exc
