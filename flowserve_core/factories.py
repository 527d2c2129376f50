"""The factory of each component kind: what ``register(name, factory)`` accepts (public API,
like the hookspecs and the Protocols in ``interfaces``).

The registration hooks take a ``Register[<Kind>Factory]``, so a type checker holds a plugin's
factory (a function, or a class whose constructor matches) to its kind's signature. Arguments
are passed by position."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol, TypeVar

from flowserve_core.interfaces import (
    BatchScheduler,
    Executor,
    Frontend,
    JobScheduler,
    KVCacheManager,
    KVTransport,
    Scaler,
    Tokenizer,
)
from flowserve_core.types import DeploymentSpec, KVCacheSpec

if TYPE_CHECKING:
    from flowserve_core.config import ServerConfig

#: ``kv_transports(name)``: the deployment's KV transport of that name in this process, built on
#: first use (on the event loop: a constructor may connect to a cluster) and then reused.
KVTransports = Callable[[str], KVTransport]


class TokenizerFactory(Protocol):
    """Builds a deployment's tokenizer (server process, in a worker thread)."""

    def __call__(self, spec: DeploymentSpec, /) -> Tokenizer: ...


class ExecutorFactory(Protocol):
    """Builds an instance's executor: loads the weights (instance process, in a worker thread)."""

    def __call__(self, spec: DeploymentSpec, /) -> Executor: ...


class KVCacheManagerFactory(Protocol):
    """Builds the KV cache manager over the blocks ``kv`` the executor reserved."""

    def __call__(self, spec: DeploymentSpec, kv: KVCacheSpec, /) -> KVCacheManager: ...


class BatchSchedulerFactory(Protocol):
    """Builds an instance's batch scheduler over its KV cache manager; ``kv_transports`` serves
    the PD handoffs (publish on the prefill side, fetch on the decode side)."""

    def __call__(self, spec: DeploymentSpec, kv_cache: KVCacheManager, kv_transports: KVTransports, /
                 ) -> BatchScheduler: ...


class JobSchedulerFactory(Protocol):
    """Builds a deployment's job scheduler (server process); ``kv_transports`` lets it release
    the KV handoffs of jobs that end early."""

    def __call__(self, spec: DeploymentSpec, kv_transports: KVTransports, /) -> JobScheduler: ...


class ScalerFactory(Protocol):
    """Builds a deployment's scaler (server process)."""

    def __call__(self, spec: DeploymentSpec, /) -> Scaler: ...


class KVTransportFactory(Protocol):
    """Builds a KV transport in a process that sends or receives KV blocks."""

    def __call__(self, spec: DeploymentSpec, /) -> KVTransport: ...


class FrontendFactory(Protocol):
    """Builds the API a server speaks, from the server's configuration."""

    def __call__(self, config: ServerConfig, /) -> Frontend: ...


FactoryT = TypeVar("FactoryT", contravariant=True)


class Register(Protocol[FactoryT]):
    """The ``register`` a registration hook receives: ``register(name, factory)`` adds the
    component ``name``; registering a name twice is an error that names both plugins."""

    def __call__(self, name: str, factory: FactoryT, /) -> None: ...
