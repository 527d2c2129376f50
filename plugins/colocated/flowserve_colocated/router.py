"""Job scheduler ``colocated``: one task per request, on the least-loaded colocated instance.

Options (``DeploymentSpec.options``):

- ``retry_on_instance_death`` (int, default 2): how many times a task is retried on another
  instance when its instance dies before the task produced any token. Once tokens went to
  the client, a retry would repeat them, so the task fails with the instance's error instead.
- ``instance_wait_timeout`` (seconds, default 600): how long a request waits for a ready
  instance (scale from zero: it waits while the scaler starts one; it is not rejected).

SLO admission (when the deployment has ``slo_ttft_seconds``): a request that would queue
behind every instance's full batch is refused early (429) when its estimated p90 time to
first token exceeds the SLO. The estimate is fitted online, ``overhead + seconds per task
ahead × tasks ahead`` plus 1.28 standard deviations of the fit's residuals, from the TTFTs
the admitted requests really had: it follows whatever slows the
engine (longer prompts, a busier machine), where a fixed ``max_queue`` cannot.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack

from flowserve_colocated.estimate import LinearFit
from flowserve_core import telemetry
from flowserve_core.deployment import InstancePool
from flowserve_core.errors import EngineDeadError
from flowserve_core.factories import KVTransports
from flowserve_core.interfaces import EmitEvent, Instance
from flowserve_core.types import (
    DeploymentSpec,
    Job,
    Rejection,
    Request,
    Task,
    TaskRole,
    TaskState,
    TokenEvent,
)

log = logging.getLogger(__name__)

#: Standard normal quantile of 0.9: the TTFT SLO is a p90 bound.
P90_Z = 1.2816


def load_key(instance: Instance) -> tuple[int, int, int, int]:
    """Sort key of an instance's load, lightest first: tasks the server has in flight there,
    then what it last reported: prefill tokens waiting, sequences running, free KV blocks."""
    stats = instance.stats
    return (instance.num_tasks, stats.scheduler.waiting_prefill_tokens,
            stats.scheduler.num_running, -(stats.kv.free_blocks + stats.kv.cached_blocks))


class InstanceDied(Exception):
    """The task's instance died before the task produced a token: the task may run elsewhere.
    ``ColocatedJobScheduler.run_on`` raises it; ``error`` says what the instance reported."""

    def __init__(self, error: str):
        super().__init__(error)
        self.error = error


class ColocatedJobScheduler:
    """Each request is a job of one colocated task, run on the least-loaded ready instance and
    retried elsewhere (boundedly) if its instance dies before the first token."""

    role = TaskRole.COLOCATED

    def __init__(self, spec: DeploymentSpec, kv_transports: KVTransports):
        self.spec = spec
        self.kv_transports = kv_transports  # colocated hands off no KV; the PD subclasses do
        options = spec.options
        self.max_retries = int(options.get("retry_on_instance_death", 2))
        self.wait_timeout = float(options.get("instance_wait_timeout", 600.0))
        if self.max_retries < 0:
            raise ValueError(f"option retry_on_instance_death must be >= 0, got {self.max_retries}")
        #: time to first token against the tasks ahead on the instance a task was placed on
        self.ttft_by_tasks_ahead = LinearFit()

    def admission(self, request: Request, pool: InstancePool) -> Rejection | None:
        """Refuse (429) a request whose estimated time to first token exceeds the deployment's
        TTFT SLO. Never while an instance has a free batch slot (it starts at once, and its
        measured TTFT keeps the fit current), nor before the fit has data."""
        slo = self.spec.slo_ttft_seconds
        ready = pool.ready(self.role) if slo else []
        if not slo or not ready:
            return None
        ahead = min(i.num_tasks for i in ready)
        if ahead < self.spec.max_num_seqs:
            return None
        # The SLO holds at p90: compare the fit's p90 (line + 1.28 σ of its residuals), not its mean.
        estimate = self.ttft_by_tasks_ahead.predict_quantile(ahead, P90_Z)
        if estimate is None or estimate <= slo:
            return None
        return Rejection(message=f"the estimated p90 time to first token ({estimate:.1f} s) exceeds the "
                                 f"deployment's TTFT SLO ({slo:g} s); retry later",
                         status=429, retry_after=max(1.0, estimate - slo))

    def make_job(self, request: Request) -> Job:
        """A job of one colocated task."""
        job = Job(request=request)
        job.tasks.append(Task(job_id=job.id, role=self.role, request=request))
        return job

    async def run_job(self, job: Job, pool: InstancePool, emit: EmitEvent) -> None:
        """Place the task, forward its events, retry it if its instance dies before a token."""
        task = job.tasks[0]
        failed_on: set[str] = set()
        job.move_to(TaskState.RUNNING)
        task.move_to(TaskState.RUNNING)
        while True:
            job.attempts += 1
            instance = await self._place(pool, failed_on)
            try:
                last = await self.run_on(instance, task, emit)
            except InstanceDied as died:
                failed_on.add(instance.info.id)
                log.warning("instance %s died before task %s produced a token (attempt %d): %s",
                            instance.info.id, task.id, job.attempts, died.error,
                            extra={"task_id": task.id, "instance": instance.info.id})
                if job.attempts > self.max_retries:
                    last = TokenEvent(task_id=task.id, finish_reason="error",
                                      error=f"{died.error} (gave up after {job.attempts} attempts "
                                            f"on instances that died)")
                    await emit(last)
                else:
                    continue
            ends: dict[str | None, TaskState] = {"error": TaskState.FAILED, "abort": TaskState.ABORTED}
            state = ends.get(last.finish_reason if last else "error", TaskState.DONE)
            task.move_to(state)
            job.move_to(state)
            return

    async def _place(self, pool: InstancePool, avoid: set[str]) -> Instance:
        """The least-loaded ready instance, waiting for one if there is none (scale from zero)."""
        try:
            ready = await pool.wait_ready(self.role, timeout=self.wait_timeout)
        except TimeoutError:
            raise TimeoutError(f"no {self.role.value} instance became ready within "
                               f"{self.wait_timeout:g} s") from None
        fresh = [i for i in ready if i.info.id not in avoid]
        return min(fresh or ready, key=load_key)

    async def run_on(self, instance: Instance, task: Task, emit: EmitEvent) -> TokenEvent | None:
        """Run ``task`` on ``instance`` and forward its events; the last one, or None if the
        stream ended without one. Raises ``InstanceDied`` if it died before any token (the
        caller may place the task elsewhere). Subclasses (pd-scheduler's) run each phase here."""
        produced = False
        ahead = instance.num_tasks
        try:
            with telemetry.task_span(task, instance.info), ExitStack() as importing:
                importing.enter_context(telemetry.kv_transfer_span(task, instance.info))
                async with instance.submit(task) as events:
                    async for event in events:
                        importing.close()  # the first event: the KV is in (or the task failed)
                        if event.instance_failed and not produced:
                            raise InstanceDied(event.error or "the instance died")
                        if event.token_ids and not produced:
                            produced = True
                            self.ttft_by_tasks_ahead.add(ahead, time.time() - task.request.arrival_time)
                        await emit(event)
                        if event.finish_reason:
                            return event
        except EngineDeadError as exc:  # it was no longer ready when we submitted
            if produced:
                raise
            raise InstanceDied(str(exc)) from None
        return None
