"""Job scheduler ``pd-hybrid``: a deployment with colocated instances *and* prefill/decode
instances; per request it takes the colocated or the disaggregated path.

The choice weighs the request's estimated new prefill tokens (its prompt, less a prefix a
prefill instance recently computed) against each pool's queued prefill work: a long prefill
on a colocated instance stalls every decode running there (their TPOT), so long prompts go
to the prefill pool unless it is far busier; short prompts stay colocated (no KV transfer)
unless the colocated pool is congested: more prefill tokens queued, or more sequences on its
least busy instance than on the least busy decode instance (by more than
``hybrid_sequence_slack``, default 1). Option ``hybrid_long_prompt_tokens`` (default 256)
says what "long" is.
"""

from __future__ import annotations

from flowserve_colocated.router import ColocatedJobScheduler
from flowserve_core.deployment import InstancePool
from flowserve_core.factories import KVTransports
from flowserve_core.interfaces import EmitEvent, Instance
from flowserve_core.types import DeploymentSpec, Job, Rejection, Request, Task, TaskRole, TaskState
from flowserve_pd_scheduler.disaggregated import DisaggregatedJobScheduler
from flowserve_pd_scheduler.placement import LOCALITY_TOKENS, waiting_tokens


class HybridJobScheduler(DisaggregatedJobScheduler):
    """Colocated or disaggregated, per request, from prompt length and pool load."""

    def __init__(self, spec: DeploymentSpec, kv_transports: KVTransports):
        super().__init__(spec, kv_transports)
        self.long_prompt_tokens = int(spec.options.get("hybrid_long_prompt_tokens", 256))
        self.sequence_slack = int(spec.options.get("hybrid_sequence_slack", 1))
        self.chosen = {TaskRole.COLOCATED: 0, TaskRole.PREFILL: 0}

    def make_job(self, request: Request) -> Job:
        """Three tasks, of which ``run_job`` runs either the first or the other two (an
        embedding: one task, run on a colocated or a prefill instance)."""
        job = super().make_job(request)
        if request.pooling is not None:
            return job
        job.tasks.insert(0, Task(job_id=job.id, role=TaskRole.COLOCATED, request=request))
        return job

    def choose(self, request: Request, pool: InstancePool) -> TaskRole:
        """``COLOCATED`` or ``PREFILL`` (the disaggregated path) for ``request`` now."""
        colocated, prefills = pool.ready(TaskRole.COLOCATED), pool.ready(TaskRole.PREFILL)
        if not colocated or not prefills or not pool.ready(TaskRole.DECODE):
            # A pool that is not ready (starting, or scaled to zero): take the one that is, or
            # the one the deployment has, rather than wait.
            if colocated:
                return TaskRole.COLOCATED
            if prefills and pool.ready(TaskRole.DECODE):
                return TaskRole.PREFILL
            return TaskRole.COLOCATED if self.spec.colocated_instances else TaskRole.PREFILL
        cached = LOCALITY_TOKENS if tuple(request.prompt_token_ids[:LOCALITY_TOKENS]) in self._last_prefill_on else 0
        new_tokens = max(1, len(request.prompt_token_ids) - cached)
        colocated_queue = min(waiting_tokens(i) for i in colocated)
        prefill_queue = min(waiting_tokens(i) for i in prefills)
        if new_tokens >= self.long_prompt_tokens:
            return TaskRole.COLOCATED if prefill_queue > colocated_queue + 4 * new_tokens else TaskRole.PREFILL
        if colocated_queue > prefill_queue + self.long_prompt_tokens:
            return TaskRole.PREFILL
        # Short prompts queue no prefill work to speak of, so the prefill queues cannot tell
        # a colocated instance that decodes a crowd from one that idles: the sequences do.
        colocated_seqs = min(_sequences(i) for i in colocated)
        decode_seqs = min(_sequences(i) for i in pool.ready(TaskRole.DECODE))
        return TaskRole.PREFILL if colocated_seqs > decode_seqs + self.sequence_slack else TaskRole.COLOCATED

    def admission(self, request: Request, pool: InstancePool) -> Rejection | None:
        """SLO admission for requests that would take the disaggregated path (its estimates
        are of the prefill and decode pools; the colocated path has none)."""
        if self.choose(request, pool) is TaskRole.COLOCATED:
            return None
        return super().admission(request, pool)

    async def run_job(self, job: Job, pool: InstancePool, emit: EmitEvent) -> None:
        """Run the chosen path's tasks; the others are marked aborted (never started)."""
        role = self.choose(job.request, pool)
        self.chosen[role] += 1
        if job.request.pooling is not None:
            if role is TaskRole.COLOCATED:
                await self._run_colocated(job, pool, emit)
            else:
                await self.run_embedding(job, pool, emit)
            return
        colocated, prefill, decode = job.tasks
        if role is TaskRole.COLOCATED:
            prefill.move_to(TaskState.ABORTED)
            decode.move_to(TaskState.ABORTED)
            job.tasks = [colocated]
            await self._run_colocated(job, pool, emit)
            return
        colocated.move_to(TaskState.ABORTED)
        job.tasks = [prefill, decode]
        await super().run_job(job, pool, emit)

    async def _run_colocated(self, job: Job, pool: InstancePool, emit: EmitEvent) -> None:
        # The colocated router's own loop: least-loaded colocated instance, retry on death.
        await ColocatedJobScheduler.run_job(self, job, pool, emit)


def _sequences(instance: Instance) -> int:
    """Sequences on an instance: tasks the server has in flight there, or what it reported."""
    scheduler = instance.stats.scheduler
    return max(instance.num_tasks, scheduler.num_running + scheduler.num_waiting)
