"""The ``prewarm`` scaler under scripted load, with real instance processes (toy executor,
which cannot pre-load: instances come from the pre-warmed pool) and fast policy settings."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import anyio
import pytest

from flowserve_core.deployment import Deployment
from flowserve_core.plugins import PluginManager
from flowserve_core.types import InstanceState, Request, SamplingParams
from flowserve_prewarm_scaler.plugin import PrewarmScaler
from flowserve_test_fixtures import toy_spec

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

FAST = {"start_path": "auto", "pool_size": 2, "scale_interval": 0.1, "scale_up_cooldown": 0.2,
        "scale_down_delay": 1.0, "target_concurrency": 2}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def pm():
    return PluginManager()


def request(first: int, max_tokens: int) -> Request:
    return Request(prompt_token_ids=[first], params=SamplingParams(max_tokens=max_tokens))


async def generate(deployment: Deployment, first: int, max_tokens: int) -> list[int]:
    async with deployment.open(request(first, max_tokens)) as stream:
        events = [event async for event in stream]
    assert events[-1].finish_reason == "length", events[-1]
    return [t for e in events for t in e.token_ids]


async def wait_until(deployment: Deployment, check, timeout: float = 60) -> None:
    with anyio.fail_after(timeout):
        while not check():
            with anyio.move_on_after(0.2):
                await deployment.pool.wait_changed()


def live(deployment: Deployment) -> list:
    return [i for i in deployment.pool.instances.values()
            if i.info.state in (InstanceState.WARMING, InstanceState.READY)]


async def test_a_burst_at_zero_instances_is_fully_served(pm):
    spec = toy_spec(scaler="prewarm", min_instances=0, max_instances=3, scale_to_zero_after=30,
                    options={**FAST, "step_delay": 0.01})
    deployment = Deployment(spec, pm)
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        assert not deployment.pool.instances  # nothing runs before the burst
        results: dict[int, list[int]] = {}

        async def one(first: int) -> None:
            results[first] = await generate(deployment, first, 4)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as burst:
                for first in range(10, 30):
                    burst.start_soon(one, first)
        assert results == {f: [f + 1, f + 2, f + 3, f + 4] for f in range(10, 30)}
        paths = {i.info.start_path for i in deployment.pool.ready()}
        # The toy executor cannot pre-load, so fork-clone fell back to the pre-warmed pool.
        assert paths <= {"prewarmed", "naive"} and paths, paths
        assert all(i.info.pid and i.info.pid != os.getpid() for i in deployment.pool.ready())
        check_metrics(deployment)
        await deployment.stop()
        tg.cancel_scope.cancel()


def check_metrics(deployment: Deployment) -> None:
    """/metrics (when flowserve-openai is installed) counts the cold starts by path."""
    metrics = pytest.importorskip("flowserve_openai.metrics")
    server = SimpleNamespace(deployments={deployment.name: deployment})  # all the collector reads
    text = metrics.ServerMetrics(server).exposition().decode()
    ready = deployment.pool.ready()
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("flowserve:instance_cold_start_seconds_count{"))
    assert counted == len(ready), text
    for path in {i.info.start_path for i in ready}:
        assert f'path="{path}"' in text
    assert f'flowserve:num_instances{{model_name="toy",state="ready"}} {float(len(ready))}' in text


async def test_scale_up_scale_down_and_scale_to_zero_under_scripted_load(pm):
    spec = toy_spec(scaler="prewarm", min_instances=1, max_instances=4, scale_to_zero_after=3,
                    options={**FAST, "step_delay": 0.02})
    deployment = Deployment(spec, pm)
    scaler = deployment.scaler
    assert isinstance(scaler, PrewarmScaler)
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)

        # Load: 8 long requests at target concurrency 2 per instance → up to 4 instances.
        async with anyio.create_task_group() as load:
            for first in range(8):
                load.start_soon(generate, deployment, first * 1000, 100_000)
            await wait_until(deployment, lambda: len(deployment.pool.ready()) == 4)
            assert len(live(deployment)) == 4  # max_instances bounds it
            load.cancel_scope.cancel()  # the clients go away

        # One light client keeps the deployment busy: down to one instance after the delay.
        async with anyio.create_task_group() as light:
            light.start_soon(generate, deployment, 5, 100_000)
            await wait_until(deployment, lambda: len(live(deployment)) == 1, timeout=30)
            assert scaler.target == 1
            light.cancel_scope.cancel()

        # Idle for scale_to_zero_after seconds: no instance at all, then a request brings one.
        await wait_until(deployment, lambda: not deployment.pool.instances, timeout=30)
        assert scaler.target == 0
        with anyio.fail_after(60):
            assert await generate(deployment, 7, 2) == [8, 9]
        await deployment.stop()
        tg.cancel_scope.cancel()


async def test_a_killed_instance_is_replaced_and_no_request_hangs(pm):
    spec = toy_spec(scaler="prewarm", min_instances=2, max_instances=2,
                    options={**FAST, "autoscale": False, "step_delay": 0.02})
    deployment = Deployment(spec, pm)
    async with anyio.create_task_group() as tg:
        await tg.start(deployment.run)
        await wait_until(deployment, lambda: len(deployment.pool.ready()) == 2)
        victim = deployment.pool.ready()[0]
        endings: list = []

        async def long_request(first: int) -> None:
            async with deployment.open(request(first, 100_000)) as stream:
                async for event in stream:
                    if event.finish_reason:
                        endings.append(event)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as load:
                for first in range(4):
                    load.start_soon(long_request, first)
                while victim.num_tasks == 0 or victim.stats.generation_tokens < 4:
                    await anyio.sleep(0.05)
                on_victim = victim.num_tasks
                os.kill(victim.info.pid, signal.SIGKILL)
                # The victim's requests end with an error; the survivor's keep running.
                while len(endings) < on_victim:
                    await anyio.sleep(0.05)
                load.cancel_scope.cancel()
        assert endings and all(e.finish_reason == "error" and "is gone" in e.error for e in endings)
        await wait_until(deployment, lambda: len(deployment.pool.ready()) == 2
                         and victim.info.id not in deployment.pool.instances)
        assert victim.info.state is InstanceState.GONE
        with anyio.fail_after(30):
            assert await generate(deployment, 50, 3) == [51, 52, 53]
        await deployment.stop()
        tg.cancel_scope.cancel()


async def test_scale_to_zero_is_per_deployment(pm):
    """Two deployments of one server (sharing the pre-warmed pool): the one with
    ``scale_to_zero_after`` goes to zero when idle, the other keeps its ``min_instances``;
    the one at zero comes back for its next request."""
    sleepy = Deployment(toy_spec(name="sleepy", scaler="prewarm", min_instances=1, max_instances=2,
                                 scale_to_zero_after=2, options={**FAST, "step_delay": 0.01}), pm)
    steady = Deployment(toy_spec(name="steady", scaler="prewarm", min_instances=1, max_instances=2,
                                 options={**FAST, "step_delay": 0.01}), pm)
    async with anyio.create_task_group() as tg:
        await tg.start(sleepy.run)
        await tg.start(steady.run)
        assert sleepy.scaler.resources is steady.scaler.resources
        # Each serves a request (sleepy may already be at zero when it comes: it has idled
        # since it started, and warming on a busy machine can outlast scale_to_zero_after).
        for deployment in (sleepy, steady):
            with anyio.fail_after(60):
                assert await generate(deployment, 3, 2) == [4, 5]
        await wait_until(sleepy, lambda: not sleepy.pool.instances, timeout=60)
        assert sleepy.scaler.target == 0
        # steady idled just as long, and keeps its min_instances (target None: the bounds' floor)
        assert len(steady.role_targets(steady.scaler.target)) == 1 and len(steady.pool.ready()) == 1
        with anyio.fail_after(60):
            assert await generate(steady, 7, 2) == [8, 9]
            assert await generate(sleepy, 7, 2) == [8, 9]
        assert len(sleepy.pool.ready()) == 1
        await sleepy.stop()
        await steady.stop()
        tg.cancel_scope.cancel()
