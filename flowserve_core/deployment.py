"""A deployment: one served model, its instances, its job scheduler and its scaler.
``Deployment.open(request)`` admits a request and streams its events; leaving the ``async with``
early (the client went away) cancels its job, which aborts its tasks."""

from __future__ import annotations

import inspect
import logging
import math
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

import anyio
import msgspec
from anyio.abc import TaskStatus

from flowserve_core import telemetry
from flowserve_core.errors import ConfigError, EngineDeadError, RejectedError
from flowserve_core.interfaces import (
    AdmissionControl,
    Instance,
    JobScheduler,
    ObservesRequests,
    ReportsContextLength,
    Scaler,
    Tokenizer,
)
from flowserve_core.plugins import PluginManager
from flowserve_core.types import (
    DeploymentSpec,
    FinishReason,
    InstanceState,
    Rejection,
    Request,
    RequestMetrics,
    RequestOutput,
    RequestState,
    TaskRole,
    TokenEvent,
)

log = logging.getLogger(__name__)


class InstancePool:
    """A deployment's instances by id, and a way to wait until one of a role is ready."""

    def __init__(self, on_demand: Callable[[TaskRole], None] = lambda role: None):
        self.instances: dict[str, Instance] = {}
        self.on_demand = on_demand
        self.closed = False  # the deployment stopped: no instance will come, so waiters give up
        #: instances that joined and that ended over the pool's life: the scale events (/metrics)
        self.started = 0
        self.stopped = 0
        self._changed = anyio.Event()

    def notify(self) -> None:
        """Wake everyone waiting for a change (an instance came, went, or changed state)."""
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def ready(self, role: TaskRole | None = None) -> list[Instance]:
        return [i for i in self.instances.values() if i.info.state is InstanceState.READY
                and (role is None or i.info.role is role)]

    def by_state(self) -> dict[str, int]:
        counts = {state.value: 0 for state in InstanceState}
        for instance in self.instances.values():
            counts[instance.info.state.value] += 1
        return counts

    async def wait_ready(self, role: TaskRole, timeout: float = math.inf) -> list[Instance]:
        """Ready instances of ``role``; if none, ask the scaler for one and wait (scale from zero).
        ``EngineDeadError`` once the pool is closed."""
        with anyio.fail_after(timeout):
            while not (found := self.ready(role)):
                if self.closed:
                    raise EngineDeadError("the deployment was removed before an instance could take the task")
                self.on_demand(role)
                await self.wait_changed()
        return found

    async def run(self, instance: Instance, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run ``instance`` as a member of this pool until it ends; scalers call this."""
        self.instances[instance.info.id] = instance
        self.started += 1
        instance.on_change = self.notify
        self.notify()
        try:
            await instance.run(task_status=task_status)
        finally:
            self.instances.pop(instance.info.id, None)
            self.stopped += 1
            if instance.info.state is not InstanceState.GONE:
                instance.info.move_to(InstanceState.GONE)
            self.notify()


class DeploymentStats(msgspec.Struct, kw_only=True):
    """A deployment's load as its API and scaler see it."""

    num_running: int
    num_waiting: int
    instances: dict[str, int]
    kv_used_blocks: int = 0
    kv_total_blocks: int = 0


class Deployment:
    """One served model: its spec, tokenizer, job scheduler, scaler and instance pool."""

    def __init__(self, spec: DeploymentSpec, pm: PluginManager):
        self.spec = spec
        self.pm = pm
        self._tokenizer: Tokenizer | None = None
        self.job_scheduler: JobScheduler = pm.build("job_scheduler", spec.job_scheduler, spec, pm.kv_transports(spec))
        self.scaler: Scaler = pm.build("scaler", spec.scaler, spec)
        self.pool = InstancePool(on_demand=self.scaler.on_demand)
        self.requests: dict[str, Request] = {}
        self.ready = anyio.Event()
        self.stopping = False
        self._scope = anyio.CancelScope()
        # observer hooks that no plugin implements are not called at all
        self._observe = {name: bool(getattr(pm.hook, name).get_hookimpls())
                         for name in ("flowserve_admit_request", "flowserve_request_admitted")}

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tokenizer(self) -> Tokenizer:
        """The deployment's tokenizer, built by ``run`` before the deployment is ready."""
        if self._tokenizer is None:
            raise ConfigError(f"deployment {self.name!r} has no tokenizer yet: it is still starting")
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        from_tokenizer = self.tokenizer.max_model_len if isinstance(self.tokenizer, ReportsContextLength) else None
        return self.spec.max_model_len or from_tokenizer or 2048

    def role_targets(self, target: int | None = None) -> list[TaskRole]:
        """The roles of the instances this deployment should run (``target`` overrides counts)."""
        spec = self.spec
        split = [TaskRole.COLOCATED] * spec.colocated_instances + \
            [TaskRole.PREFILL] * spec.prefill_instances + [TaskRole.DECODE] * spec.decode_instances
        if target is None:
            return split or [TaskRole.COLOCATED] * spec.min_instances
        return [TaskRole.COLOCATED] * target if not split or target == 0 else split

    def stats(self) -> DeploymentStats:
        running = sum(r.state is RequestState.RUNNING for r in self.requests.values())
        instances = list(self.pool.instances.values())
        return DeploymentStats(
            num_running=running, num_waiting=len(self.requests) - running, instances=self.pool.by_state(),
            kv_used_blocks=sum(i.stats.kv.used_blocks for i in instances),
            kv_total_blocks=sum(i.stats.kv.total_blocks for i in instances))

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Check the spec, build the tokenizer, start the scaler and the startup hooks; run until stopped."""
        try:  # a spec that can never run fails here, once, not in every instance it would start
            await anyio.to_thread.run_sync(lambda: self.pm.hook.flowserve_check_deployment(spec=self.spec, plugins=self.pm))
        except ValueError as exc:
            raise ConfigError(f"deployment {self.name!r}: {exc}") from None
        self._tokenizer = await anyio.to_thread.run_sync(self.pm.build, "tokenizer", self.spec.tokenizer, self.spec)
        with self._scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.scaler.run, self)
                await _await_all(self.pm.hook.flowserve_startup(deployment=self))
                self.ready.set()
                task_status.started()
                try:
                    await anyio.sleep_forever()
                finally:
                    with anyio.CancelScope(shield=True):
                        await _await_all(self.pm.hook.flowserve_shutdown(deployment=self))
                    tg.cancel_scope.cancel()

    async def stop(self, drain_timeout: float = 0.0) -> None:
        """Drain every instance for up to ``drain_timeout`` s, then stop (scalers then start none)."""
        self.stopping = self.pool.closed = True
        self.pool.notify()
        async with anyio.create_task_group() as tg:
            for instance in list(self.pool.instances.values()):
                tg.start_soon(instance.stop, drain_timeout)
        self._scope.cancel()

    def admit(self, request: Request) -> None:
        """Raise ``RejectedError`` if the request may not be queued now."""
        rejection = self.queue_rejection()
        if rejection is None and isinstance(self.job_scheduler, AdmissionControl):
            rejection = self.job_scheduler.admission(request, self.pool)
        if rejection is None and self._observe["flowserve_admit_request"]:
            rejection = self.pm.hook.flowserve_admit_request(request=request, deployment=self)
        if rejection is not None:
            raise RejectedError(rejection)

    def queue_rejection(self) -> Rejection | None:
        """The 429 when the queue is full, else None (frontends ask before parsing a request)."""
        if len(self.requests) < self.spec.max_queue:
            return None
        return Rejection(message=f"the queue of {self.name!r} is full ({self.spec.max_queue} requests); "
                                 "retry later", status=429, retry_after=1.0)

    @asynccontextmanager
    async def open(self, request: Request) -> AsyncIterator[RequestHandle]:
        """Admit ``request``; iterate the handle for its events until the last one
        (``finish_reason`` set). Raises ``RejectedError`` when it may not be queued."""
        self.admit(request)
        request.model = request.model or self.name
        self.requests[request.id] = request
        handle = RequestHandle(self, request)
        if self._observe["flowserve_request_admitted"]:
            self.pm.hook.flowserve_request_admitted(request=request, deployment=self)
        with telemetry.request_span(request, self.name):
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(handle.run_job)
                    with handle.receive:
                        yield handle
                    tg.cancel_scope.cancel()
            finally:
                self.requests.pop(request.id, None)
                handle.finish()


class RequestHandle:
    """One admitted request: iterate it for its events; it keeps the output and timings."""

    def __init__(self, deployment: Deployment, request: Request):
        self.deployment, self.request = deployment, request
        self.send, self.receive = anyio.create_memory_object_stream[TokenEvent](math.inf)
        self.metrics = RequestMetrics(arrival_time=request.arrival_time)
        self.output = RequestOutput(request_id=request.id, metrics=self.metrics)

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self.receive.__aiter__()

    def finished_early(self, reason: FinishReason = "stop") -> None:
        """The caller ended the request itself (e.g. a stop string matched in the text)."""
        self.output.finish_reason = reason

    async def run_job(self) -> None:
        job = self.deployment.job_scheduler.make_job(self.request)
        async with self.send:
            try:
                with telemetry.job_span(job, self.deployment.name):
                    await self.deployment.job_scheduler.run_job(job, self.deployment.pool, self.emit)
                if self.output.finish_reason is None:
                    await self._fail("the job ended without a last event")
            except (EngineDeadError, TimeoutError) as exc:
                await self._fail(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            except Exception as exc:
                log.exception("job failed", extra={"request_id": self.request.id})
                await self._fail(f"internal error: {exc!r}")

    async def _fail(self, error: str) -> None:
        if self.output.finish_reason is None:
            await self.emit(TokenEvent(task_id=self.request.id, finish_reason="error", error=error))

    async def emit(self, event: TokenEvent) -> None:
        metrics, output = self.metrics, self.output
        if self.request.state is RequestState.WAITING:
            self.request.move_to(RequestState.RUNNING)
            metrics.scheduled_time = time.time()
        if event.token_ids and metrics.first_token_time is None:
            metrics.first_token_time = time.time()
        output.output_token_ids.extend(event.token_ids)
        output.num_prompt_tokens = event.num_prompt_tokens or output.num_prompt_tokens
        output.num_cached_tokens = max(event.num_cached_tokens, output.num_cached_tokens)
        if event.finish_reason:
            output.finish_reason, output.error = event.finish_reason, event.error
        await self.send.send(event)

    def finish(self) -> None:
        """Close the books: final state, metrics, observers."""
        output, request = self.output, self.request
        self.metrics.finished_time = time.time()
        reason = output.finish_reason
        state = {None: RequestState.ABORTED, "abort": RequestState.ABORTED,
                 "error": RequestState.FAILED}.get(reason, RequestState.FINISHED)
        if request.state is RequestState.WAITING and state is RequestState.FINISHED:
            request.move_to(RequestState.RUNNING)
        if request.state in (RequestState.WAITING, RequestState.RUNNING):
            request.move_to(state)
        if isinstance(self.deployment.scaler, ObservesRequests):
            self.deployment.scaler.observe(output)
        self.deployment.pm.hook.flowserve_request_finished(request=request, output=output, deployment=self.deployment)


async def _await_all(results: list[Any]) -> None:
    """Await whatever hook implementations returned awaitables (datasette's await_me_maybe)."""
    for result in results:
        if inspect.isawaitable(result):
            await result
