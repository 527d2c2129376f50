"""Placement and admission of the PD job schedulers, on a real ``InstancePool`` of real
instance handles whose load reports are set by hand: prefill by queued prefill tokens (with
the prefills placed but not yet reported), then tasks, with prefix locality; decode by tasks
(reserved ones included) and running sequences, then free KV blocks, with the decode
instance holding the prompt's prefix preferred; instances that died are avoided; TPOT
admission; ``pd-hybrid``'s choice of path."""

from __future__ import annotations

import functools

import anyio
import pytest

from flowserve_core.deployment import InstancePool
from flowserve_core.plugins import PluginManager
from flowserve_core.types import (
    DeploymentSpec,
    InstanceInfo,
    InstanceState,
    InstanceStats,
    KVUsage,
    Request,
    SamplingParams,
    SchedulerStats,
    Task,
    TaskRole,
    TokenEvent,
)
from flowserve_instance_runtime import InstanceBase
from flowserve_pd_scheduler.disaggregated import DisaggregatedJobScheduler
from flowserve_pd_scheduler.hybrid import HybridJobScheduler
from flowserve_pd_scheduler.placement import LOCALITY_TOKENS

pytestmark = pytest.mark.anyio

#: these schedulers hand off no KV: asking for a transport would fail, naming it
NO_KV_TRANSPORTS = PluginManager(load_entrypoints=False).kv_transports(DeploymentSpec())


def instance(pool: InstancePool, name: str, role: TaskRole, *, tasks: int = 0, prefill: int = 0, running: int = 0,
             waiting: int = 0, free: int = 0) -> InstanceBase:
    """A ready instance handle in ``pool`` reporting this load (``tasks``: tasks in flight)."""
    handle = InstanceBase(InstanceInfo(id=name, role=role))
    handle.info.move_to(InstanceState.READY)
    handle._streams = {f"{name}-{i}": None for i in range(tasks)}
    handle.stats = InstanceStats(scheduler=SchedulerStats(waiting_prefill_tokens=prefill, num_running=running,
                                                          num_waiting=waiting),
                                 kv=KVUsage(free_blocks=free))
    pool.instances[name] = handle
    return handle


def request(length: int, first: int = 3) -> Request:
    return Request(prompt_token_ids=list(range(first, first + length)), params=SamplingParams(max_tokens=4))


def spec(**overrides) -> DeploymentSpec:
    fields = dict(name="pd", model="m", job_scheduler="pd-disaggregated", prefill_instances=3, decode_instances=3)
    fields.update(overrides)
    return DeploymentSpec(**fields)


async def test_prefill_goes_where_the_fewest_prefill_tokens_are_queued_then_the_fewest_tasks():
    pool = InstancePool()
    instance(pool, "busy", TaskRole.PREFILL, tasks=2, prefill=100)
    instance(pool, "backlog", TaskRole.PREFILL, tasks=1, prefill=1500)
    instance(pool, "light", TaskRole.PREFILL, tasks=3, prefill=40)  # the most tasks, the least work
    instance(pool, "decode", TaskRole.DECODE)  # never a prefill target
    scheduler = DisaggregatedJobScheduler(spec(), NO_KV_TRANSPORTS)
    chosen = await scheduler._place_prefill(pool, set(), request(10))
    assert chosen.info.id == "light"
    # An instance that died under this task is avoided while another is ready.
    again = await scheduler._place_prefill(pool, {"light"}, request(10, first=50))
    assert again.info.id == "busy"  # 100 tokens queued beat 1,500 on fewer tasks
    instance(pool, "tie", TaskRole.PREFILL, tasks=1, prefill=100)
    assert (await scheduler._place_prefill(pool, {"light"}, request(10, first=90))).info.id == "tie"


class Quiet(InstanceBase):
    """A ready instance handle whose tasks stay in flight until the test ends them."""

    async def send_task(self, task) -> None:
        pass

    async def abort_task(self, task_id: str) -> None:
        pass


async def test_prefills_placed_but_not_yet_reported_count_as_queued_tokens():
    pool = InstancePool()
    first, second = (Quiet(InstanceInfo(id=name, role=TaskRole.PREFILL)) for name in ("first", "second"))
    for handle in (first, second):
        handle.info.move_to(InstanceState.READY)
        pool.instances[handle.info.id] = handle
    scheduler = DisaggregatedJobScheduler(spec(), NO_KV_TRANSPORTS)
    long = Task(role=TaskRole.PREFILL, request=request(900))
    async with anyio.create_task_group() as group:
        group.start_soon(functools.partial(scheduler._phase, long, pool, None, scheduler._place_prefill,
                                           forward_last=False))
        while not first.num_tasks:  # placed on "first" (a tie: the first one)
            await anyio.sleep(0.01)
        # Neither instance has reported anything yet; "first" has 900 prompt tokens coming.
        assert scheduler.queued_prefill_tokens(first) == 900
        assert (await scheduler._place_prefill(pool, set(), request(10, first=400))).info.id == "second"
        first.dispatch([TokenEvent(task_id=long.id, token_ids=[1], finish_reason="length")])
    assert scheduler.queued_prefill_tokens(first) == 0  # its first token came: nothing counted any more


async def test_prefill_prefers_the_instance_that_holds_the_prefix_unless_far_more_tokens_are_queued_there():
    pool = InstancePool()
    a = instance(pool, "a", TaskRole.PREFILL)
    b = instance(pool, "b", TaskRole.PREFILL, tasks=1)
    scheduler = DisaggregatedJobScheduler(spec(options={"pd_locality_slack_tokens": 100}), NO_KV_TRANSPORTS)
    shared = request(LOCALITY_TOKENS + 20)
    assert (await scheduler._place_prefill(pool, set(), shared)).info.id == "a"
    # "a" has more prefill tokens queued than "b" now, but within the slack: the same prefix
    # goes back to "a".
    a.stats.scheduler.waiting_prefill_tokens = 80
    same_prefix = Request(prompt_token_ids=shared.prompt_token_ids[:LOCALITY_TOKENS] + [9, 9, 9],
                          params=SamplingParams(max_tokens=4))
    assert (await scheduler._place_prefill(pool, set(), same_prefix)).info.id == "a"
    # A different prefix takes the lighter instance; past the slack, so does the shared one.
    assert (await scheduler._place_prefill(pool, set(), request(LOCALITY_TOKENS + 20, first=500))).info.id == "b"
    a.stats.scheduler.waiting_prefill_tokens = 101
    assert (await scheduler._place_prefill(pool, set(), same_prefix)).info.id == "b"
    # A prompt shorter than the locality key has no prefix to follow.
    b.stats.scheduler.waiting_prefill_tokens = 900
    assert (await scheduler._place_prefill(pool, set(), request(LOCALITY_TOKENS - 1))).info.id == "a"


async def test_decode_goes_to_the_fewest_running_sequences_then_the_most_free_blocks():
    pool = InstancePool()
    instance(pool, "crowded", TaskRole.DECODE, running=9, free=500)
    instance(pool, "full", TaskRole.DECODE, running=2, free=5)
    instance(pool, "roomy", TaskRole.DECODE, running=2, free=80)
    instance(pool, "prefill", TaskRole.PREFILL)
    scheduler = DisaggregatedJobScheduler(spec(), NO_KV_TRANSPORTS)
    assert (await scheduler._place_decode(pool, set())).info.id == "roomy"
    assert (await scheduler._place_decode(pool, {"roomy"})).info.id == "full"
    # Every decode instance failed this task: the least loaded of them rather than none.
    assert (await scheduler._place_decode(pool, {"crowded", "full", "roomy"})).info.id == "roomy"


async def test_decode_prefers_the_instance_holding_the_prompt_prefix_and_counts_reserved_decodes():
    pool = InstancePool()
    holder = instance(pool, "holder", TaskRole.DECODE, running=1, free=10)
    instance(pool, "idle", TaskRole.DECODE, running=0, free=500)
    scheduler = DisaggregatedJobScheduler(spec(options={"pd_locality_slack": 2}), NO_KV_TRANSPORTS)
    req = request(100)  # 6 full blocks of 16
    assert (await scheduler._place_decode(pool, set(), req)).info.id == "idle"  # nobody holds it
    index = scheduler.prefix_index
    index.add("holder", index.hashes(req.prompt_token_ids[:64]))
    assert index.held("holder", index.hashes(req.prompt_token_ids)) == 4
    assert (await scheduler._place_decode(pool, set(), req)).info.id == "holder"
    # Busier by more than the slack: the prefix is not worth the wait.
    holder._streams = {f"h-{i}": None for i in range(3)}
    assert (await scheduler._place_decode(pool, set(), req)).info.id == "idle"
    # Decodes reserved by prefills under way count as tasks (their prefill runs, so the
    # instance does not know them yet): without the reservation every request of a burst
    # would pick the same instance.
    holder._streams = {}
    scheduler._decode_reserved["holder"] = 3
    assert (await scheduler._place_decode(pool, set(), req)).info.id == "idle"
    # An instance that is gone is forgotten (its replacement starts with an empty cache).
    del pool.instances["holder"]
    await scheduler._place_decode(pool, set(), req)
    assert index.held("holder", index.hashes(req.prompt_token_ids)) == 0


async def test_tpot_admission_refuses_with_429_only_while_every_decode_instance_is_busy():
    pool = InstancePool()
    instance(pool, "p", TaskRole.PREFILL)
    d1 = instance(pool, "d1", TaskRole.DECODE, running=4)
    instance(pool, "d2", TaskRole.DECODE, running=0)
    scheduler = DisaggregatedJobScheduler(spec(slo_tpot_seconds=0.1), NO_KV_TRANSPORTS)
    assert scheduler.admission(request(8), pool) is None  # nothing measured yet
    scheduler.decode_seconds_per_token.add(0.25)
    assert scheduler.admission(request(8), pool) is None  # d2 is idle: it decodes at once
    pool.instances["d2"].stats.scheduler.num_running = 1
    refused = scheduler.admission(request(8), pool)
    assert refused is not None and refused.status == 429 and refused.retry_after >= 1
    assert "250 ms per token" in refused.message and "TPOT SLO (100 ms)" in refused.message
    d1.stats.scheduler.num_running = 0
    assert scheduler.admission(request(8), pool) is None


async def test_ttft_admission_refuses_with_429_when_the_fit_predicts_a_miss_behind_queued_prefills():
    pool = InstancePool()
    instance(pool, "p", TaskRole.PREFILL, tasks=1, prefill=2000)
    instance(pool, "d", TaskRole.DECODE)
    scheduler = DisaggregatedJobScheduler(spec(slo_ttft_seconds=2.0), NO_KV_TRANSPORTS)
    assert scheduler.admission(request(100), pool) is None  # no fit yet: nothing refused blind
    for tokens in (100, 400, 800, 1600):
        scheduler.prefill_time.add(tokens, 0.1 + tokens * 0.001)
    refused = scheduler.admission(request(100), pool)  # ≈ 0.1 + 2.1 s > 2 s
    assert refused is not None and refused.status == 429 and "TTFT SLO (2 s)" in refused.message
    pool.instances["p"].stats.scheduler.waiting_prefill_tokens = 100
    assert scheduler.admission(request(100), pool) is None  # ≈ 0.3 s


async def test_hybrid_chooses_by_new_prefill_tokens_and_pool_load():
    pool = InstancePool()
    colocated = instance(pool, "c", TaskRole.COLOCATED)
    prefill = instance(pool, "p", TaskRole.PREFILL)
    instance(pool, "d", TaskRole.DECODE)
    hybrid = HybridJobScheduler(spec(job_scheduler="pd-hybrid", colocated_instances=1, prefill_instances=1,
                                     decode_instances=1, options={"hybrid_long_prompt_tokens": 256}), NO_KV_TRANSPORTS)
    assert hybrid.choose(request(40), pool) is TaskRole.COLOCATED  # short: no transfer
    assert hybrid.choose(request(600), pool) is TaskRole.PREFILL  # long: keep it off colocated decodes
    # A long prompt still goes colocated when the prefill pool is far busier.
    prefill.stats.scheduler.waiting_prefill_tokens = 5000
    assert hybrid.choose(request(600), pool) is TaskRole.COLOCATED
    prefill.stats.scheduler.waiting_prefill_tokens = 0
    # A short prompt spills to the disaggregated path when the colocated pool is congested:
    # prefill work queued, or more sequences than the least busy decode instance.
    colocated.stats.scheduler.waiting_prefill_tokens = 1000
    assert hybrid.choose(request(40), pool) is TaskRole.PREFILL
    colocated.stats.scheduler.waiting_prefill_tokens = 0
    colocated.stats.scheduler.num_running = 5
    assert hybrid.choose(request(40), pool) is TaskRole.PREFILL
    colocated.stats.scheduler.num_running = 1  # within hybrid_sequence_slack (1) of the idle decode
    assert hybrid.choose(request(40), pool) is TaskRole.COLOCATED
    # Prompt tokens a prefill instance recently computed do not count as new tokens.
    hybrid.long_prompt_tokens = 40
    known = request(LOCALITY_TOKENS + 10, first=900)
    assert hybrid.choose(known, pool) is TaskRole.PREFILL
    hybrid._last_prefill_on[tuple(known.prompt_token_ids[:LOCALITY_TOKENS])] = "p"
    assert hybrid.choose(known, pool) is TaskRole.COLOCATED  # 10 new tokens: short


async def test_hybrid_takes_the_pool_that_is_ready():
    pool = InstancePool()
    instance(pool, "p", TaskRole.PREFILL)
    instance(pool, "d", TaskRole.DECODE)
    hybrid = HybridJobScheduler(spec(job_scheduler="pd-hybrid", colocated_instances=1, prefill_instances=1,
                                     decode_instances=1), NO_KV_TRANSPORTS)
    assert hybrid.choose(request(8), pool) is TaskRole.PREFILL  # no colocated instance ready
    instance(pool, "c", TaskRole.COLOCATED)
    del pool.instances["d"]
    assert hybrid.choose(request(600), pool) is TaskRole.COLOCATED  # no decode instance ready


def test_a_request_is_a_job_of_a_prefill_task_then_a_decode_task():
    req = request(12)
    job = DisaggregatedJobScheduler(spec(), NO_KV_TRANSPORTS).make_job(req)
    assert [t.role for t in job.tasks] == [TaskRole.PREFILL, TaskRole.DECODE]
    assert all(t.job_id == job.id and t.request is req for t in job.tasks)
    hybrid = HybridJobScheduler(spec(job_scheduler="pd-hybrid", colocated_instances=1), NO_KV_TRANSPORTS)
    assert [t.role for t in hybrid.make_job(req).tasks] == [TaskRole.COLOCATED, TaskRole.PREFILL, TaskRole.DECODE]
