"""A PD decode task's KV fetch runs in a worker thread: the engine keeps stepping the other
sequences while a fetch blocks (``torch-dist`` may wait up to its timeout), an abort during a
fetch ends the task at once and its handoff is released when the fetch returns, and the
fetch time is what ``kv_transfer_seconds`` counts.

A real kernel ``Engine`` drives the ``continuous`` scheduler, a ``paged`` cache and the toy
``counter`` executor (it ignores KV, so imported bytes need no meaning), with a transport
``gated`` registered by the test whose ``fetch`` blocks until the test opens its gate.
"""

from __future__ import annotations

import threading
import time
import types

import anyio
import pytest

from flowserve_colocated import ContinuousBatchScheduler
from flowserve_core import hookimpl
from flowserve_core.engine import Engine
from flowserve_core.plugins import get_plugin_manager
from flowserve_core.types import KVCacheSpec, KVHandoff, Request, SamplingParams, Task, TaskRole
from flowserve_paged_kv import PagedKVCacheManager
from flowserve_test_fixtures import CounterExecutor, toy_spec

pytestmark = pytest.mark.anyio


class Gated:
    """Transport ``gated``: ``fetch`` waits for ``gate`` (30 s at most), then returns zeros."""

    def __init__(self):
        self.gate = threading.Event()
        self.fetching: list[str] = []
        self.released: list[str] = []

    def build(self, spec):
        return self

    def publish(self, data, key: str) -> str:
        raise AssertionError("nothing is published in this test")

    def fetch(self, handoff: KVHandoff) -> memoryview:
        self.fetching.append(handoff.locator)
        if not self.gate.wait(30):
            raise TimeoutError("the test never opened the gate")
        return memoryview(bytes(handoff.nbytes))

    def release(self, locator: str) -> None:
        self.released.append(locator)


@pytest.fixture
def gated():
    transport = Gated()
    pm = get_plugin_manager()
    pm.register(types.SimpleNamespace(flowserve_register_kv_transports=hookimpl(
        lambda register: register("gated", transport.build))), name="test-gated-transport")
    try:
        yield transport
    finally:
        transport.gate.set()
        pm.unregister("test-gated-transport")


def decode_task(prompt: list[int], first: int, locator: str, max_tokens: int = 5) -> Task:
    """A decode task as a prefill hands it over: the prompt, its first token and the handoff
    of all its blocks (4 tokens each here)."""
    blocks = -(-len(prompt) // 4)
    return Task(id=f"decode-{locator}", role=TaskRole.DECODE, output_token_ids=[first],
                request=Request(prompt_token_ids=prompt, params=SamplingParams(max_tokens=max_tokens)),
                kv_handoff=KVHandoff(transport="gated", locator=locator, num_tokens=len(prompt), block_size=4,
                                     nbytes=blocks * 64))


def colocated_task(prompt: list[int], max_tokens: int) -> Task:
    return Task(id=f"colocated-{prompt[0]}", request=Request(prompt_token_ids=prompt,
                                                             params=SamplingParams(max_tokens=max_tokens)))


async def until(condition, seconds: float = 10.0) -> None:
    with anyio.fail_after(seconds):
        while not condition():
            await anyio.sleep(0.005)


async def test_the_engine_keeps_stepping_while_a_fetch_blocks_and_an_abort_is_not_held_up(gated):
    spec = toy_spec(kv_cache="paged", batch_scheduler="continuous", kv_transport="gated")
    kv = PagedKVCacheManager(spec, KVCacheSpec(num_blocks=64, block_size=4, max_model_len=256))
    scheduler = ContinuousBatchScheduler(spec, kv, get_plugin_manager().kv_transports(spec))
    events: dict[str, list] = {}

    async def emit(batch) -> None:
        for event in batch:
            events.setdefault(event.task_id, []).append(event)

    def tokens(task_id: str) -> list[int]:
        return [t for e in events.get(task_id, []) for t in e.token_ids]

    def ended(task_id: str) -> str | None:
        return events[task_id][-1].finish_reason if events.get(task_id) else None

    engine = Engine(CounterExecutor(spec), scheduler, emit)
    async with anyio.create_task_group() as group:
        group.start_soon(engine.run)
        # The decode task arrives first and its fetch blocks; the colocated task behind it is
        # admitted, and runs to its end, while the fetch waits.
        engine.submit(decode_task(list(range(10, 19)), first=50, locator="h1"))
        engine.submit(colocated_task([100, 101, 102], max_tokens=20))
        await until(lambda: ended("colocated-100") is not None)
        assert tokens("colocated-100") == list(range(103, 123))
        assert gated.fetching == ["h1"] and "decode-h1" not in events
        stats = scheduler.stats()
        assert (stats.num_running, stats.num_waiting) == (1, 0)  # it holds its blocks and a slot
        time.sleep(0.2)  # (the gate stays shut a measurable while)
        gated.gate.set()
        await until(lambda: ended("decode-h1") is not None)
        assert tokens("decode-h1") == [51, 52, 53, 54] and ended("decode-h1") == "length"
        assert events["decode-h1"][0].num_cached_tokens == 0  # its cache held nothing; the KV came
        await until(lambda: "h1" in gated.released)
        stats = scheduler.stats()
        assert stats.kv_transfer_bytes == 3 * 64 and stats.kv_transfer_seconds >= 0.2

        # Aborted while its fetch blocks: the abort is not held up; when the fetch returns
        # its handoff is released and nothing is imported.
        gated.gate.clear()
        engine.submit(decode_task(list(range(30, 39)), first=70, locator="h2"))
        await until(lambda: "h2" in gated.fetching)
        engine.submit(colocated_task([200, 201], max_tokens=5))
        engine.abort("decode-h2")
        await until(lambda: ended("decode-h2") is not None and ended("colocated-200") is not None)
        assert ended("decode-h2") == "abort" and tokens("decode-h2") == []
        assert tokens("colocated-200") == [202, 203, 204, 205, 206]
        assert "h2" not in gated.released
        gated.gate.set()
        await until(lambda: "h2" in gated.released)
        await until(lambda: not scheduler.has_work())
        assert kv.usage().used_blocks == 0
        assert scheduler.stats().kv_transfer_bytes == 3 * 64
        group.cancel_scope.cancel()
