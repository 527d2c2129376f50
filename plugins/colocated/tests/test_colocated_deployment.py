"""End to end through the kernel: ``Deployment`` with in-process instances (scaler
``inproc``), the toy ``counter`` executor, the ``paged`` KV cache, the ``continuous`` batch
scheduler and the ``colocated`` job scheduler."""

from __future__ import annotations

import types

import anyio
import pytest

from flowserve_core import hookimpl
from flowserve_core.deployment import Deployment
from flowserve_core.errors import EngineDeadError
from flowserve_core.types import Request, SamplingParams, StepBatch, StepResult
from flowserve_test_fixtures import CounterExecutor, toy_spec

pytestmark = pytest.mark.anyio


def spec(**overrides):
    fields = dict(kv_cache="paged", batch_scheduler="continuous", job_scheduler="colocated")
    fields.update(overrides)
    return toy_spec(**fields)


def request(prompt: list[int], max_tokens: int) -> Request:
    return Request(prompt_token_ids=prompt, params=SamplingParams(max_tokens=max_tokens))


async def generate(deployment: Deployment, req: Request):
    """Run one request to its end; its events and the handle's output record."""
    events = []
    async with deployment.open(req) as handle:
        async for event in handle:
            events.append(event)
    return events, handle.output


def tokens_of(events) -> list[int]:
    return [t for e in events for t in e.token_ids]


def register_executor(pm, name: str, factory) -> None:
    """Register a test executor on the real plugin manager, as a plugin would."""
    plugin = types.SimpleNamespace(
        flowserve_register_executors=hookimpl(lambda register: register(name, factory)))
    pm.register(plugin, name=f"test-executor-{name}")


def checked_counter(kv_memory):
    """A ``counter`` executor that also plays paged attention over a simulated KV memory,
    so the block tables the kernel carries are checked on every step."""

    class CheckedCounter(CounterExecutor):
        def __init__(self, spec):
            super().__init__(spec)
            self.memory = None

        def _compute(self, batch: StepBatch) -> StepResult:
            if self.memory is None:
                self.memory = kv_memory(types.SimpleNamespace(block_size=16, ref_count=lambda b: 1))
            self.memory.run(batch)
            return super()._compute(batch)

    return CheckedCounter


async def test_many_requests_through_a_tiny_cache_preempt_and_stay_exact(pm, kv_memory):
    register_executor(pm, "checked-counter", checked_counter(kv_memory))
    # 8 blocks of 16 tokens; 24 requests that each grow to 50 tokens (4 blocks).
    deployment = Deployment(spec(executor="checked-counter", max_num_batched_tokens=48,
                                 options={"num_blocks": 8}), pm)
    prompts = [list(range(30 * i, 30 * i + 20)) for i in range(24)]
    results: dict[int, tuple] = {}
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as clients:
                for i, prompt in enumerate(prompts):
                    async def one(i=i, prompt=prompt):
                        results[i] = await generate(deployment, request(prompt, 30))
                    clients.start_soon(one)
        (instance,) = deployment.pool.instances.values()
        stats = instance.stats
        tg.cancel_scope.cancel()
    for i, prompt in enumerate(prompts):
        events, output = results[i]
        assert tokens_of(events) == [(prompt[-1] + k) % 1000 for k in range(1, 31)], i
        assert output.finish_reason == "length" and output.num_prompt_tokens == 20
    assert stats.scheduler.num_preemptions > 0
    assert stats.kv.used_blocks == 0 and stats.kv.total_blocks == 8


async def test_requests_sharing_a_long_prefix_hit_the_prefix_cache(pm):
    deployment = Deployment(spec(), pm)
    prefix = list(range(100, 164))  # 4 blocks of 16
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        with anyio.fail_after(60):
            events, first = await generate(deployment, request(prefix + [7], 3))
            assert first.num_cached_tokens == 0
            outputs = {}
            async with anyio.create_task_group() as clients:
                for suffix in range(8):
                    async def one(suffix=suffix):
                        outputs[suffix] = await generate(deployment, request(prefix + [suffix * 10, 500], 4))
                    clients.start_soon(one)
        (instance,) = deployment.pool.instances.values()
        usage = instance.stats.kv
        tg.cancel_scope.cancel()
    for suffix, (events, output) in outputs.items():
        assert tokens_of(events) == [501, 502, 503, 504]
        assert output.num_cached_tokens == 64, suffix
    assert usage.prefix_hits == 8 * 64
    assert usage.prefix_queries == 65 + 8 * 66


async def test_requests_spread_over_the_least_loaded_instances(pm):
    deployment = Deployment(spec(min_instances=2, max_instances=2, options={"step_delay": 0.01}), pm)
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        with anyio.fail_after(60):
            while len(deployment.pool.ready()) < 2:
                await deployment.pool.wait_changed()
            outputs = {}
            async with anyio.create_task_group() as clients:
                for i in range(10):
                    async def one(i=i):
                        outputs[i] = await generate(deployment, request([10 * i], 5))
                    clients.start_soon(one)
        steps = [i.stats.steps for i in deployment.pool.instances.values()]
        tg.cancel_scope.cancel()
    assert all(tokens_of(events) == [10 * i + k for k in range(1, 6)] for i, (events, _) in outputs.items())
    assert len(steps) == 2 and all(s > 0 for s in steps), steps


async def test_a_request_waits_for_the_first_instance_when_scaled_to_zero(pm):
    deployment = Deployment(spec(min_instances=0, max_instances=1), pm)
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        assert not deployment.pool.instances
        with anyio.fail_after(60):
            events, output = await generate(deployment, request([5], 3))
        tg.cancel_scope.cancel()
    assert tokens_of(events) == [6, 7, 8] and output.finish_reason == "length"


async def test_a_task_is_retried_when_its_instance_dies_before_any_token(pm):
    built = []

    class DiesFirstTime(CounterExecutor):
        """The first instance's executor dies on its first step; later ones work."""

        def __init__(self, spec):
            super().__init__(spec)
            built.append(self)

        async def execute(self, batch):
            if self is built[0]:
                raise EngineDeadError("injected death of the first instance")
            return await super().execute(batch)

    register_executor(pm, "dies-first-time", DiesFirstTime)
    deployment = Deployment(spec(executor="dies-first-time"), pm)
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        with anyio.fail_after(60):
            events, output = await generate(deployment, request([40, 41], 4))
        tg.cancel_scope.cancel()
    assert tokens_of(events) == [42, 43, 44, 45] and output.finish_reason == "length"
    assert all(e.finish_reason != "error" for e in events)
    assert len(built) == 2


async def test_a_task_that_already_streamed_fails_with_the_instance_error(pm):
    deployment = Deployment(spec(options={"die_after_steps": 3}), pm)
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        with anyio.fail_after(60):
            events, output = await generate(deployment, request([1], 10))
        tg.cancel_scope.cancel()
    assert tokens_of(events) == [2, 3, 4]
    assert output.finish_reason == "error" and "injected death" in output.error


async def test_retries_are_bounded(pm):
    deployment = Deployment(spec(options={"die_after_steps": 0, "retry_on_instance_death": 1}), pm)
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        with anyio.fail_after(60):
            events, output = await generate(deployment, request([1], 10))
        tg.cancel_scope.cancel()
    assert tokens_of(events) == [] and len(events) == 1
    assert output.finish_reason == "error"
    assert "injected death" in output.error and "gave up after 2 attempts" in output.error


async def test_a_task_too_big_for_the_cache_fails_at_once_with_both_numbers(pm):
    deployment = Deployment(spec(options={"num_blocks": 2}), pm)
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        with anyio.fail_after(60):
            events, output = await generate(deployment, request(list(range(40)), 10))
            # the instance is fine: the next request runs
            ok, _ = await generate(deployment, request([3], 2))
        tg.cancel_scope.cancel()
    assert output.finish_reason == "error"
    assert "49 tokens (4 blocks of 16)" in output.error and "has 2 blocks (32 tokens)" in output.error
    assert tokens_of(ok) == [4, 5]


@pytest.mark.slow
async def test_instance_processes_that_die_are_retried_then_given_up(pm):
    """The same bounded retry when instances are processes (scaler ``static``), where the
    error comes from the instance process and is marked ``instance_failed``."""
    pytest.importorskip("flowserve_instance_runtime")
    deployment = Deployment(spec(scaler="static", options={
        "die_after_steps": 0, "retry_on_instance_death": 1}), pm)
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        with anyio.fail_after(120):
            events, output = await generate(deployment, request([1], 10))
        tg.cancel_scope.cancel()
    assert output.finish_reason == "error" and "gave up after 2 attempts" in output.error


def test_load_order_is_tasks_then_prefill_backlog_then_running_then_free_blocks():
    from flowserve_colocated import load_key
    from flowserve_core.types import InstanceInfo, InstanceStats, KVUsage, SchedulerStats
    from flowserve_instance_runtime import InstanceBase

    def instance(name, tasks=0, prefill=0, running=0, free=0):
        handle = InstanceBase(InstanceInfo(id=name))
        handle._streams = {f"{name}-{i}": None for i in range(tasks)}
        handle.stats = InstanceStats(scheduler=SchedulerStats(waiting_prefill_tokens=prefill, num_running=running),
                                     kv=KVUsage(free_blocks=free))
        return handle

    candidates = [instance("busy", tasks=2), instance("backlog", tasks=1, prefill=500),
                  instance("running", tasks=1, prefill=10, running=9, free=100),
                  instance("roomy", tasks=1, prefill=10, running=3, free=5),
                  instance("roomier", tasks=1, prefill=10, running=3, free=50)]
    ranked = [i.info.id for i in sorted(candidates, key=load_key)]
    assert ranked == ["roomier", "roomy", "running", "backlog", "busy"]
