"""FlowServe's hook specifications: the public plugin API (docs/reference/hooks.md).

A plugin is a module with functions marked ``@flowserve_core.hookimpl`` named as below, found
through the ``flowserve`` entry-point group; it may take fewer arguments than a specification.
Components are registered by name, ``register(name, factory)``, and chosen by name; once built
they are called directly: hooks never sit in the per-token loop. Each kind's factory signature
is a Protocol in ``flowserve_core.factories`` (``ExecutorFactory``, ...)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

from flowserve_core.factories import (
    BatchSchedulerFactory,
    ExecutorFactory,
    FrontendFactory,
    JobSchedulerFactory,
    KVCacheManagerFactory,
    KVTransportFactory,
    Register,
    ScalerFactory,
    TokenizerFactory,
)
from flowserve_core.interfaces import PluginLookup

if TYPE_CHECKING:
    import typer

    from flowserve_core.deployment import Deployment
    from flowserve_core.structured_output import StructuredOutputBackendFactory
    from flowserve_core.tool_calls import ToolCallParserFactory
    from flowserve_core.types import DeploymentSpec, Rejection, Request, RequestOutput

PROJECT_NAME = "flowserve"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# ------------------------------------------------------------------ component registration
# Each is called once per process, the first time a component of that kind is looked up (in
# the server, and in every worker process that builds one). Not firstresult: every plugin may
# register several names, and they return nothing. Each may also take ``plugins``, the manager
# that is registering it (``interfaces.PluginLookup``): a factory that will look up other
# plugins' components (an executor's structured-output backend, say) is handed it here rather
# than fetching a process-global manager.


@hookspec
def flowserve_register_tokenizers(register: Register[TokenizerFactory], plugins: PluginLookup) -> None:
    """Register tokenizers: ``register("hf", factory)``. Not firstresult.

    :param register: ``register(name, factory)``; ``factory(spec: DeploymentSpec)`` returns an
        ``interfaces.Tokenizer``. Called in any process that builds a tokenizer (the server).
    :param plugins: the manager registering it (take it only if a factory needs it)."""


@hookspec
def flowserve_register_executors(register: Register[ExecutorFactory], plugins: PluginLookup) -> None:
    """Register executors (model runners): ``register("spmd", factory)``. Not firstresult.

    :param register: ``register(name, factory)``; ``factory(spec)`` returns an
        ``interfaces.Executor``. Called in the process that hosts an engine instance.
    :param plugins: the manager registering it (take it only if a factory needs it)."""


@hookspec
def flowserve_register_kv_cache_managers(register: Register[KVCacheManagerFactory], plugins: PluginLookup) -> None:
    """Register KV cache managers: ``register("paged", factory)``. Not firstresult.

    :param register: ``register(name, factory)``; ``factory(spec, kv: KVCacheSpec)`` returns an
        ``interfaces.KVCacheManager`` over the blocks the executor reserved. Called in the
        process that hosts an engine instance.
    :param plugins: the manager registering it (take it only if a factory needs it)."""


@hookspec
def flowserve_register_batch_schedulers(register: Register[BatchSchedulerFactory], plugins: PluginLookup) -> None:
    """Register batch schedulers (what runs in each engine step). Not firstresult.

    :param register: ``register(name, factory)``; ``factory(spec, kv_cache, kv_transports)``
        (``factories.BatchSchedulerFactory``) returns an ``interfaces.BatchScheduler``. Called
        in the process that hosts an engine instance.
    :param plugins: the manager registering it (take it only if a factory needs it)."""


@hookspec
def flowserve_register_job_schedulers(register: Register[JobSchedulerFactory], plugins: PluginLookup) -> None:
    """Register job schedulers (request → job → tasks → instances). Not firstresult.

    :param register: ``register(name, factory)``; ``factory(spec, kv_transports)``
        (``factories.JobSchedulerFactory``) returns an ``interfaces.JobScheduler``. Called in
        the server process, once per deployment.
    :param plugins: the manager registering it (take it only if a factory needs it)."""


@hookspec
def flowserve_register_scalers(register: Register[ScalerFactory], plugins: PluginLookup) -> None:
    """Register scalers (they start, stop and count instances). Not firstresult.

    :param register: ``register(name, factory)``; ``factory(spec)`` returns an
        ``interfaces.Scaler``. Called in the server process, once per deployment.
    :param plugins: the manager registering it (take it only if a factory needs it)."""


@hookspec
def flowserve_register_kv_transports(register: Register[KVTransportFactory], plugins: PluginLookup) -> None:
    """Register KV transports (move KV blocks between instances). Not firstresult.

    :param register: ``register(name, factory)``; ``factory(spec)`` returns an
        ``interfaces.KVTransport``. Called in every process that sends or receives KV blocks.
    :param plugins: the manager registering it (take it only if a factory needs it)."""


@hookspec
def flowserve_register_structured_output_backends(register: Register[StructuredOutputBackendFactory], plugins: PluginLookup) -> None:
    """Register structured-output backends (JSON schema, regex, choice and grammar constraints as
    token masks): ``register("xgrammar", factory)``. Not firstresult.

    :param register: ``register(name, factory)``; ``factory(spec)`` returns a
        ``structured_output.StructuredOutputBackend``. Called in the server process (to check
        constraints before admitting requests) and in the process that samples (the executor's).
    :param plugins: the manager registering it (take it only if a factory needs it)."""


@hookspec
def flowserve_register_tool_parsers(register: Register[ToolCallParserFactory], plugins: PluginLookup) -> None:
    """Register tool-call parsers (a model family's tool-call markup → OpenAI ``tool_calls``):
    ``register("hermes", factory)``. Not firstresult.

    :param register: ``register(name, factory)``; ``factory(spec)`` returns a
        ``tool_calls.ToolCallParser``. Called in the server process, when a request with tools
        first needs the deployment's parser.
    :param plugins: the manager registering it (take it only if a factory needs it)."""


@hookspec
def flowserve_register_frontends(register: Register[FrontendFactory], plugins: PluginLookup) -> None:
    """Register frontends (the API a server speaks): ``register("openai", factory)``. Not firstresult.

    :param register: ``register(name, factory)``; ``factory(config: ServerConfig)`` returns an
        ``interfaces.Frontend``. Called in the server process by ``flowserve serve``.
    :param plugins: the manager registering it (take it only if a factory needs it)."""


@hookspec
def flowserve_register_model_architectures(register: Callable[..., None], plugins: PluginLookup) -> None:
    """Register model architectures for executors that build models from HF checkpoints (the
    ``spmd`` executor): ``register("qwen3", factory, hf_architectures=["Qwen3ForCausalLM"])``.
    Not firstresult.

    :param register: ``register(model_type, factory, hf_architectures=())``; ``model_type`` is
        the ``model_type`` of a checkpoint's ``config.json``, ``hf_architectures`` the class names
        in its ``architectures`` that also select it, and ``factory(config, group, max_positions,
        dtype, device)`` returns the model's ``torch.nn.Module`` for one tensor-parallel rank
        (the executor's docs say what it must offer).
    :param plugins: the manager registering it (take it only if a factory needs it). Asked each
        time such a model is loaded or checked, of the manager that built the executor (server,
        instance processes) or, in a tensor-parallel worker rank, of that process's own."""


@hookspec
def flowserve_register_commands(app: typer.Typer) -> None:
    """Add subcommands to the ``flowserve`` CLI: ``@app.command() def bench(...)``. Not firstresult.

    :param app: the root ``typer.Typer`` that ``build_cli`` is building. Called once, in the CLI
        process; keep heavy imports inside the commands so ``flowserve --help`` stays fast."""


@hookspec
def flowserve_serve_flags() -> list[str]:
    """Name plugin options that ``flowserve serve`` also takes as flags (no :param entries): with
    ``["ray_address"]``, ``--ray-address VALUE`` means ``--option ray_address=VALUE``. Not
    firstresult (the lists are joined). Called once, in the CLI process, by ``build_cli``."""


# ------------------------------------------------------------------ lifecycle
# These may return an awaitable, which the kernel awaits: plugins may be sync or async.


@hookspec
def flowserve_check_deployment(spec: DeploymentSpec, plugins: PluginLookup) -> None:
    """Raise ``ConfigError`` (or ``ValueError``) saying why ``spec`` can never run, e.g. an
    executor whose model, dtype or tensor parallelism cannot work; return to let it start.
    Read config files or headers only, never weights: a failure stops ``flowserve serve``
    (exit 1) or answers ``POST /admin/deployments`` with 400, instead of instances failing
    to start forever.

    :param spec: the deployment about to start (check only what your components read).
    :param plugins: the server's plugin manager (take it only if the check looks up other
        plugins' components). Not firstresult. Server process, in a worker thread, before the tokenizer loads."""


@hookspec
def flowserve_startup(deployment: Deployment) -> Any:
    """A deployment has started (its scaler runs; instances may still be warming).

    :param deployment: the ``Deployment``. Returns ``None`` or an awaitable (awaited).
        Not firstresult. Server process."""


@hookspec
def flowserve_shutdown(deployment: Deployment) -> Any:
    """A deployment is stopping; its instances are being drained and stopped.

    :param deployment: the ``Deployment``. Returns ``None`` or an awaitable (awaited).
        Not firstresult. Server process."""


# ------------------------------------------------------------------ admission and observers
# Called once per request (never per token), only when some plugin implements them; in the
# server process, on the event loop: keep them quick.


@hookspec(firstresult=True)
def flowserve_admit_request(request: Request, deployment: Deployment) -> Rejection | None:
    """Refuse a request before it is queued (return a ``Rejection``: its ``status`` and ``message``
    reach the client), or return ``None`` to let others decide. **firstresult**. Server process.
    Asked after the queue limit and the job scheduler's own ``admission`` method (a component
    gives feedback through its methods, ``interfaces.AdmissionControl``; this hook is for
    policy plugins, such as quotas, that any deployment may use).

    :param request: the ``Request`` about to be admitted (tokenized, parameters validated).
    :param deployment: its ``Deployment``; ``deployment.stats()`` tells its load."""


@hookspec
def flowserve_request_admitted(request: Request, deployment: Deployment) -> None:
    """Observe a request that was admitted and is about to be scheduled. Not firstresult.

    :param request: the admitted ``Request``.
    :param deployment: its ``Deployment``. Returns nothing. Server process."""


@hookspec
def flowserve_request_finished(request: Request, output: RequestOutput, deployment: Deployment) -> None:
    """Observe a request that ended: finished, aborted or failed. Not firstresult.

    :param request: the ``Request``, its ``state`` final.
    :param output: the ``RequestOutput``: tokens, finish reason, error, timings.
    :param deployment: its ``Deployment``. Returns nothing. Server process."""
