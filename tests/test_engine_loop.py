"""The engine loop and deployment end to end, on the toy components: concurrency,
cancellation, failure; in this process and in a real instance process."""

from __future__ import annotations

import types

import anyio
import pytest

from flowserve_core import hookimpl
from flowserve_core.deployment import Deployment
from flowserve_core.engine import Engine
from flowserve_core.errors import RejectedError
from flowserve_core.types import Rejection, Request, SamplingParams, Task
from flowserve_test_fixtures import CounterExecutor, FifoScheduler, UnboundedKVCache, toy_spec

pytestmark = pytest.mark.anyio


def request(first: int, max_tokens: int = 5, **params) -> Request:
    return Request(prompt_token_ids=[first], params=SamplingParams(max_tokens=max_tokens, **params))


async def collect(deployment: Deployment, req: Request, log: list | None = None) -> list:
    events = []
    async with deployment.open(req) as stream:
        async for event in stream:
            events.append(event)
            if log is not None:
                log.append(req.id)
    return events


async def test_concurrent_requests_stream_interleaved_and_complete(pm):
    deployment = Deployment(toy_spec(options={"step_delay": 0.005}), pm)
    order: list[str] = []
    results: dict[int, list] = {}
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)

        async def one(i: int) -> None:
            results[i] = await collect(deployment, request(10 * i, max_tokens=8), order)

        async with anyio.create_task_group() as clients:
            for i in range(1, 21):
                clients.start_soon(one, i)
        tg.cancel_scope.cancel()
    for i, events in results.items():
        tokens = [t for e in events for t in e.token_ids]
        assert tokens == [10 * i + k for k in range(1, 9)]
        assert events[-1].finish_reason == "length"
    # interleaved: some request produced a token before another finished its first
    assert len(set(order[:20])) > 1
    assert deployment.stats().num_running == 0 and not deployment.requests


async def test_cancelling_a_stream_frees_its_slot(pm):
    deployment = Deployment(toy_spec(max_num_seqs=1, options={"step_delay": 0.002}), pm)
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        async with deployment.open(request(1, max_tokens=10_000)) as stream:
            seen = 0
            async for event in stream:
                seen += len(event.token_ids)
                if seen == 3:
                    break
        # the only slot is free again: the next request runs to the end
        with anyio.fail_after(5):
            events = await collect(deployment, request(100, max_tokens=3))
        assert [t for e in events for t in e.token_ids] == [101, 102, 103]
        instance = next(iter(deployment.pool.instances.values()))
        assert instance.engine.stats.scheduler.num_running == 0
        assert instance.num_tasks == 0
        tg.cancel_scope.cancel()


async def test_a_failing_step_fails_its_requests_with_an_error_event(pm):
    deployment = Deployment(toy_spec(options={"fail_on_token": 504}), pm)
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        with anyio.fail_after(10):
            bad = await collect(deployment, request(500, max_tokens=10))
            good = await collect(deployment, request(10, max_tokens=3))
        assert bad[-1].finish_reason == "error" and "injected failure" in bad[-1].error
        assert [t for e in good for t in e.token_ids] == [11, 12, 13]
        tg.cancel_scope.cancel()


async def test_a_dead_executor_fails_every_request_and_the_instance_goes(pm):
    deployment = Deployment(toy_spec(options={"die_after_steps": 3, "step_delay": 0.01}), pm)
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        outcomes: list = []

        async def one(i: int) -> None:
            outcomes.append(await collect(deployment, request(i, 100)))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as clients:
                for i in range(4):
                    clients.start_soon(one, i)
        assert len(outcomes) == 4
        for events in outcomes:
            assert events[-1].finish_reason == "error"
            assert "injected death" in events[-1].error
        tg.cancel_scope.cancel()


async def test_queue_limit_and_admission_hook(pm):
    rejected = types.SimpleNamespace(flowserve_admit_request=hookimpl(
        lambda request: Rejection(message="no prompts starting with 7", status=400)
        if request.prompt_token_ids[0] == 7 else None))
    pm.register(rejected, name="gate")
    deployment = Deployment(toy_spec(max_queue=1, options={"step_delay": 0.01}), pm)
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        with pytest.raises(RejectedError) as info:
            async with deployment.open(request(7)):
                pass
        assert info.value.rejection.status == 400
        async with deployment.open(request(1, 50)):
            with pytest.raises(RejectedError, match="queue of 'toy' is full") as info:
                async with deployment.open(request(2)):
                    pass
            assert info.value.rejection.status == 429 and info.value.rejection.retry_after
        tg.cancel_scope.cancel()


async def test_observers_and_async_lifecycle_hooks(pm):
    seen: list = []

    async def on_startup(deployment):
        await anyio.sleep(0)
        seen.append(("startup", deployment.name))

    observer = types.SimpleNamespace(
        flowserve_startup=hookimpl(on_startup),
        flowserve_request_admitted=hookimpl(lambda request: seen.append(("admitted", request.id))),
        flowserve_request_finished=hookimpl(
            lambda request, output: seen.append(("finished", request.state.value, output.finish_reason,
                                                 len(output.output_token_ids)))))
    pm.register(observer, name="observer")
    deployment = Deployment(toy_spec(), pm)
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        req = request(3, 4)
        await collect(deployment, req)
        tg.cancel_scope.cancel()
    assert seen == [("startup", "toy"), ("admitted", req.id), ("finished", "finished", "length", 4)]


async def test_new_work_ends_the_step_in_flight_early_on_an_executor_that_can(pm):
    """``EndsStepsEarly``: a task or an abort that arrives tells the executor, so a step that
    decodes several tokens returns after its round (the llamacpp executor's side is tested
    with it); an executor without it is not asked."""

    class EndsEarly(CounterExecutor):
        def __init__(self, spec):
            super().__init__(spec)
            self.asked = 0

        def end_step_early(self) -> None:
            self.asked += 1

    spec = toy_spec()
    executor = EndsEarly(spec)
    scheduler = FifoScheduler(spec, UnboundedKVCache(spec, executor.kv_cache_spec()), pm.kv_transports(spec))

    async def emit(events: list) -> None:
        pass

    engine = Engine(executor, scheduler, emit)
    task = Task(request=request(10))
    engine.submit(task)
    engine.abort(task.id)
    assert executor.asked == 2
    plain = Engine(CounterExecutor(spec), scheduler, emit)
    plain.submit(Task(request=request(20)))  # nothing to ask
