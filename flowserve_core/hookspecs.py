"""FlowServe's hook specifications: the public plugin API.

A plugin is a module (or object) with functions marked ``@flowserve_core.hookimpl`` whose
names match the specifications below, registered through the ``flowserve`` entry-point
group. Implementations may accept fewer arguments than a specification lists, which is how
specifications grow new optional arguments without breaking plugins.

Components (tokenizers, executors, schedulers, KV cache managers, scalers, KV transports,
frontends) are registered **by name** with ``register(name, factory)`` and chosen by name
from the configuration; registering a name twice for one kind is an error naming both
plugins. Once built, components are called directly: hooks never sit in the per-token loop.

Factory signatures (what each kind's ``factory`` is called with):

==================  ==============================================  ===========================
kind                factory(...)                                    returns
==================  ==============================================  ===========================
tokenizer           ``(spec: DeploymentSpec)``                      ``interfaces.Tokenizer``
executor            ``(spec: DeploymentSpec)``                      ``interfaces.Executor``
kv_cache            ``(spec: DeploymentSpec, kv: KVCacheSpec)``     ``interfaces.KVCacheManager``
batch_scheduler     ``(spec: DeploymentSpec, kv_cache)``            ``interfaces.BatchScheduler``
job_scheduler       ``(spec: DeploymentSpec)``                      ``interfaces.JobScheduler``
scaler              ``(spec: DeploymentSpec)``                      ``interfaces.Scaler``
kv_transport        ``(spec: DeploymentSpec)``                      ``interfaces.KVTransport``
frontend            ``(config: ServerConfig)``                      ``interfaces.Frontend``
==================  ==============================================  ===========================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    import typer

    from flowserve_core.deployment import Deployment
    from flowserve_core.types import Rejection, Request, RequestOutput

PROJECT_NAME = "flowserve"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Register = Callable[[str, Callable[..., Any]], None]

# ------------------------------------------------------------------ component registration
# Called once per process, the first time a component of that kind is looked up: in the
# server process, and in every worker process (instances, SPMD ranks) that builds one.


@hookspec
def flowserve_register_tokenizers(register: Register) -> None:
    """Register tokenizers: ``register("hf", factory)``.

    :param register: call it once per tokenizer with its name and a factory taking
        ``(spec: DeploymentSpec)`` and returning an ``interfaces.Tokenizer``.
    :returns: nothing. Not firstresult; every plugin may register several names.
    Called in any process that builds a tokenizer (the server, for its frontends).
    """


@hookspec
def flowserve_register_executors(register: Register) -> None:
    """Register executors (model runners): ``register("spmd", factory)``.

    :param register: ``register(name, factory)``; ``factory(spec: DeploymentSpec)`` returns an
        ``interfaces.Executor``. Not firstresult.
    Called in the process that hosts an engine instance.
    """


@hookspec
def flowserve_register_kv_cache_managers(register: Register) -> None:
    """Register KV cache managers: ``register("paged", factory)``.

    :param register: ``register(name, factory)``; ``factory(spec, kv: KVCacheSpec)`` returns an
        ``interfaces.KVCacheManager`` over the blocks the executor reserved. Not firstresult.
    Called in the process that hosts an engine instance.
    """


@hookspec
def flowserve_register_batch_schedulers(register: Register) -> None:
    """Register batch schedulers (what runs in each engine step): ``register("continuous", f)``.

    :param register: ``register(name, factory)``; ``factory(spec, kv_cache)`` returns an
        ``interfaces.BatchScheduler``. Not firstresult.
    Called in the process that hosts an engine instance.
    """


@hookspec
def flowserve_register_job_schedulers(register: Register) -> None:
    """Register job schedulers (request → job → tasks → instances): ``register("colocated", f)``.

    :param register: ``register(name, factory)``; ``factory(spec)`` returns an
        ``interfaces.JobScheduler``. Not firstresult.
    Called in the server process, once per deployment.
    """


@hookspec
def flowserve_register_scalers(register: Register) -> None:
    """Register scalers (they start, stop and count instances): ``register("prewarm", f)``.

    :param register: ``register(name, factory)``; ``factory(spec)`` returns an
        ``interfaces.Scaler``. Not firstresult.
    Called in the server process, once per deployment.
    """


@hookspec
def flowserve_register_kv_transports(register: Register) -> None:
    """Register KV transports (move KV blocks between instances): ``register("shm", f)``.

    :param register: ``register(name, factory)``; ``factory(spec)`` returns an
        ``interfaces.KVTransport``. Not firstresult.
    Called in every process that sends or receives KV blocks.
    """


@hookspec
def flowserve_register_frontends(register: Register) -> None:
    """Register frontends (the API a server speaks): ``register("openai", factory)``.

    :param register: ``register(name, factory)``; ``factory(config: ServerConfig)`` returns an
        ``interfaces.Frontend``. Not firstresult.
    Called in the server process by ``flowserve serve``.
    """


@hookspec
def flowserve_register_commands(app: typer.Typer) -> None:
    """Add subcommands to the ``flowserve`` CLI: ``@app.command() def bench(...)``.

    :param app: the root ``typer.Typer`` being built by ``build_cli``.
    :returns: nothing. Not firstresult. Called once, in the CLI process, when the app is built;
        keep heavy imports inside the command functions so ``flowserve --help`` stays fast.
    """


@hookspec
def flowserve_serve_flags() -> list[str]:
    """Name plugin options that ``flowserve serve`` also takes as flags of their own.

    No arguments (no :param entries).
    :returns: option names, e.g. ``["ray_address"]``: then ``--ray-address VALUE`` means
        ``--option ray_address=VALUE``, and ``flowserve serve --help`` lists the flag. Not
        firstresult; the lists are joined. Called once, in the CLI process, by ``build_cli``.
    """


# ------------------------------------------------------------------ lifecycle
# These may return an awaitable; the kernel awaits it, so plugins may be sync or async.


@hookspec
def flowserve_startup(deployment: Deployment) -> Any:
    """A deployment has started (its scaler runs; instances may still be warming).

    :param deployment: the ``Deployment`` that started.
    :returns: ``None`` or an awaitable, which is awaited. Not firstresult. Server process.
    """


@hookspec
def flowserve_shutdown(deployment: Deployment) -> Any:
    """A deployment is stopping; its instances are being drained and stopped.

    :param deployment: the ``Deployment`` that is stopping.
    :returns: ``None`` or an awaitable, which is awaited. Not firstresult. Server process.
    """


# ------------------------------------------------------------------ admission and observers
# Called once per request (never per token), only when some plugin implements them.


@hookspec(firstresult=True)
def flowserve_admit_request(request: Request, deployment: Deployment) -> Rejection | None:
    """Decide whether to refuse a request before it is queued.

    :param request: the ``Request`` about to be admitted (tokenized, parameters validated).
    :param deployment: its ``Deployment``; ``deployment.stats()`` tells its load.
    :returns: a ``Rejection`` to refuse (its ``status`` and ``message`` reach the client), or
        ``None`` to let other plugins and the kernel's own checks decide. **firstresult**: the
        first non-None answer wins. Server process, on the event loop: keep it quick.
    """


@hookspec
def flowserve_request_admitted(request: Request, deployment: Deployment) -> None:
    """Observe a request that was admitted and is about to be scheduled.

    :param request: the admitted ``Request``.
    :param deployment: its ``Deployment``.
    :returns: nothing. Not firstresult. Server process, on the event loop.
    """


@hookspec
def flowserve_request_finished(request: Request, output: RequestOutput, deployment: Deployment) -> None:
    """Observe a request that ended: finished, aborted (client gone, stop string) or failed.

    :param request: the ``Request``, its ``state`` final.
    :param output: the ``RequestOutput``: tokens, finish reason, error, timings.
    :param deployment: its ``Deployment``.
    :returns: nothing. Not firstresult. Server process, on the event loop.
    """
