"""Instance processes: the socket protocol, a killed process, and the static scaler."""

from __future__ import annotations

import os
import signal

import anyio
import pytest

from flowserve_core.deployment import Deployment
from flowserve_core.plugins import PluginManager
from flowserve_core.types import InstanceState, Request, SamplingParams, TaskRole
from flowserve_instance_runtime import RemoteInstance
from flowserve_test_fixtures import toy_spec

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def pm():
    return PluginManager()


def request(first: int, max_tokens: int = 5) -> Request:
    return Request(prompt_token_ids=[first], params=SamplingParams(max_tokens=max_tokens))


async def collect(deployment: Deployment, req: Request) -> list:
    async with deployment.open(req) as stream:
        return [event async for event in stream]


async def test_an_instance_process_serves_and_its_death_fails_its_requests(pm):
    deployment = Deployment(toy_spec(scaler="static", options={"step_delay": 0.01}), pm)
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        with anyio.fail_after(60):
            (instance,) = await deployment.pool.wait_ready(TaskRole.COLOCATED)
        assert isinstance(instance, RemoteInstance) and instance.info.pid != os.getpid()
        events = await collect(deployment, request(40, 3))
        assert [t for e in events for t in e.token_ids] == [41, 42, 43]
        assert instance.stats.generation_tokens == 3

        async with deployment.open(request(1, 10_000)) as stream:
            got = 0
            with anyio.fail_after(20):
                async for event in stream:
                    got += len(event.token_ids)
                    if got == 2 and instance.process.poll() is None:
                        os.kill(instance.info.pid, signal.SIGKILL)
                    last = event
        assert last.finish_reason == "error" and "is gone" in last.error
        assert instance.info.state is InstanceState.GONE
        tg.cancel_scope.cancel()


async def test_static_scaler_keeps_its_instance_processes_and_replaces_a_dead_one(pm):
    deployment = Deployment(toy_spec(scaler="static", min_instances=2, max_instances=2), pm)
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        with anyio.fail_after(60):
            while len(deployment.pool.ready()) < 2:
                await deployment.pool.wait_changed()
        pids = {i.info.pid for i in deployment.pool.ready()}
        assert len(pids) == 2 and os.getpid() not in pids
        assert all(i.info.start_path == "naive" for i in deployment.pool.ready())
        events = await collect(deployment, request(7, 2))
        assert [t for e in events for t in e.token_ids] == [8, 9]
        victim = next(iter(pids))
        os.kill(victim, signal.SIGKILL)
        with anyio.fail_after(60):
            while True:
                ready = {i.info.pid for i in deployment.pool.ready()}
                if len(ready) == 2 and victim not in ready:
                    break
                await deployment.pool.wait_changed()
        tg.cancel_scope.cancel()
