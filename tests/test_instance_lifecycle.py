"""An in-process instance stopped while it is still warming ends quietly, never ready."""

from __future__ import annotations

import time
import types

import anyio
import pytest

from flowserve_core import hookimpl
from flowserve_core.deployment import InstancePool
from flowserve_core.types import InstanceInfo, InstanceState
from flowserve_test_fixtures import CounterExecutor, toy_spec
from flowserve_testing.inprocess import LocalInstance

pytestmark = pytest.mark.anyio


async def test_stopping_a_warming_instance_does_not_make_it_ready(pm):
    def slow_counter(spec):
        time.sleep(0.3)  # loading weights, in a worker thread
        return CounterExecutor(spec)

    pm.register(types.SimpleNamespace(flowserve_register_executors=hookimpl(
        lambda register: register("slow-counter", slow_counter))), name="slow")
    spec = toy_spec(executor="slow-counter")
    pool = InstancePool()
    instance = LocalInstance(spec, pm, InstanceInfo(deployment=spec.name))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run, instance)
            await anyio.sleep(0.05)
            assert instance.info.state is InstanceState.WARMING
            await instance.stop()
    assert instance.info.state is InstanceState.GONE and not pool.instances
