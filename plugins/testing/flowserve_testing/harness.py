"""A plugin manager with chosen plugins, and a deployment running in the test's own process."""

from __future__ import annotations

import importlib.metadata
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Iterator, Sequence

import anyio
import msgspec

from flowserve_core.config import resolve_deployment
from flowserve_core.deployment import Deployment
from flowserve_core.interfaces import Instance
from flowserve_core.plugins import ENTRY_POINT_GROUP, PluginManager
from flowserve_core.types import DeploymentSpec, InstanceState, Request, RequestOutput, SamplingParams, Task
from flowserve_testing.plugin import with_kit_plugin


def plugin_manager(*names: str, plugins: Sequence[object] = ()) -> PluginManager:
    """A fresh ``PluginManager`` with only the named installed plugins, plus ``plugins``.

    :param names: entry-point names or distribution names (``"flowserve-paged-kv"``); each
        must be installed and load, else ``LookupError`` / ``PluginError`` says which.
    :param plugins: modules or objects with hook implementations, registered as ``(local)``.
    The kit's own plugin (scaler ``inproc``) is always there.
    """
    pm = with_kit_plugin(PluginManager(allow=names, blocked=(), strict=True))
    loaded = {r.name for r in pm.records} | {r.distribution for r in pm.records}
    missing = [name for name in names if name not in loaded]
    if missing:
        installed = sorted({ep.dist.name if ep.dist else ep.name
                            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})
        raise LookupError(f"no FlowServe plugin named {', '.join(map(repr, missing))} is installed "
                          f"(installed distributions: {', '.join(installed) or 'none'}); "
                          f"pip install -e your project first")
    for plugin in plugins:
        pm.register(plugin, name=getattr(plugin, "__name__", None))
    return pm


class DeploymentRunner:
    """A running in-process deployment: ``generate`` requests on it, look at its instances."""

    def __init__(self, deployment: Deployment):
        self.deployment = deployment

    @property
    def tokenizer(self) -> Any:
        return self.deployment.tokenizer

    async def generate(self, prompt: Sequence[int] | str, **params: Any) -> RequestOutput:
        """Run one request to its end; ``params`` are ``SamplingParams`` fields.

        :param prompt: token ids, or a text the deployment's tokenizer encodes.
        :returns: the ``RequestOutput``: output tokens, finish reason, error, timings.
        """
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        request = Request(prompt_token_ids=ids, params=SamplingParams(**params),
                          eos_token_ids=list(self.tokenizer.eos_token_ids))
        async with self.deployment.open(request) as handle:
            async for _ in handle:
                pass
        return handle.output

    def engines(self) -> list[Any]:
        """The engines of the instances running in this process (scaler ``inproc``)."""
        from flowserve_testing.inprocess import LocalInstance

        return [i.engine for i in self.deployment.pool.instances.values()
                if isinstance(i, LocalInstance) and i.engine is not None]

    def batch_schedulers(self) -> list[Any]:
        """The batch scheduler objects of those engines: proof of which one is in use."""
        return [engine.scheduler for engine in self.engines()]


@asynccontextmanager
async def run_deployment(spec: DeploymentSpec, *, pm: PluginManager | None = None,
                         timeout: float = 120.0) -> AsyncIterator[DeploymentRunner]:
    """Start a ``Deployment`` of ``spec`` in this process and wait for a ready instance.

    Use a spec with scaler ``inproc`` (``tiny_engine.spec()`` has it) so instances run in
    this process and their components can be inspected. ``pm`` defaults to every installed
    plugin. An instance that fails to start raises its error; so does a failed ``assert`` in
    the ``with`` block (not wrapped in an exception group).
    """
    spec = resolve_deployment(msgspec.structs.replace(spec))
    deployment = Deployment(spec, pm or with_kit_plugin(PluginManager()))
    try:
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(timeout):
                await tg.start(deployment.run)
                if deployment.role_targets():
                    await _wait_for_an_instance(deployment)
            try:
                yield DeploymentRunner(deployment)
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
                    await deployment.stop()
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _only_error(group) from None


def _only_error(group: BaseExceptionGroup) -> BaseException:
    """The one error inside the task groups' nesting (a failed assert in the test's body, an
    instance that failed to start), so tests see it as it was raised; else the group."""
    leaves = list(_leaves(group))
    causes = [e for e in leaves if not isinstance(e, InstanceStartError)] or leaves
    return causes[0] if len(causes) == 1 else group


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


class InstanceStartError(RuntimeError):
    """An instance of the deployment under test ended with an error before it was ready."""


async def _wait_for_an_instance(deployment: Deployment) -> None:
    """Until one instance is ready; an instance that ends with an error fails the wait."""
    seen: dict[str, Any] = {}
    while not deployment.pool.ready():
        seen.update((i.info.id, i.info) for i in deployment.pool.instances.values())
        failed = [info for info in seen.values() if info.state is InstanceState.GONE and info.error]
        if failed:
            raise InstanceStartError(f"instance {failed[0].id} of deployment {deployment.name!r} "
                                     f"failed to start: {failed[0].error}")
        await deployment.pool.wait_changed()


async def generate_on(instance: Instance, prompt: Sequence[int], max_tokens: int) -> list[int]:
    """Greedy tokens of one task run on ``instance`` itself, not through a job scheduler (to
    reach every instance of a pool); ``max_tokens`` exactly (``ignore_eos``). A task that
    ends in error raises ``AssertionError`` with its message."""
    task = Task(request=Request(prompt_token_ids=list(prompt), params=SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True)))
    tokens: list[int] = []
    async with instance.submit(task) as events:
        async for event in events:
            assert event.finish_reason in (None, "length"), event.error
            tokens += event.token_ids
    return tokens
