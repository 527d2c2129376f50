"""The shortest-prompt-first scheduler: conformance, its order, and a deployment using it."""

import pytest

from flowserve_core.plugins import PluginManager
from flowserve_core.testing import check_batch_scheduler, plugin_manager, run_deployment
from flowserve_core.types import DeploymentSpec, KVCacheSpec, Request, SamplingParams, StepResult, Task
from flowserve_paged_kv.manager import PagedKVCacheManager
from flowserve_shortest_prompt_first.plugin import ShortestPromptFirstScheduler

#: these schedulers hand off no KV: asking for a transport would fail, naming it
NO_KV_TRANSPORTS = PluginManager(load_entrypoints=False).kv_transports(DeploymentSpec())


def test_the_distribution_registers_shortest_prompt_first():
    component = plugin_manager("flowserve-shortest-prompt-first").get("batch_scheduler", "shortest-prompt-first")
    assert component.factory is ShortestPromptFirstScheduler


def test_it_passes_the_batch_scheduler_conformance_suite():
    check_batch_scheduler(ShortestPromptFirstScheduler)


def first_scheduled_order(prompt_lengths: list[int]) -> list[int]:
    """Indices of the tasks in the order they first ran; they arrive in list order, all
    before the first step, and one runs at a time (max_num_seqs=1)."""
    spec = DeploymentSpec(max_num_seqs=1, max_num_batched_tokens=64, block_size=4)
    scheduler = ShortestPromptFirstScheduler(spec, PagedKVCacheManager(spec, KVCacheSpec(num_blocks=64, block_size=4)), NO_KV_TRANSPORTS)
    index = {}
    for i, length in enumerate(prompt_lengths):
        task = Task(request=Request(prompt_token_ids=[7] * length, params=SamplingParams(max_tokens=2)))
        index[task.id] = i
        scheduler.add(task)
    order: list[int] = []
    while scheduler.has_work():
        batch = scheduler.schedule()
        order += [index[s.seq_id] for s in batch.seqs if index[s.seq_id] not in order]
        scheduler.update(batch, StepResult(token_ids={s.seq_id: 8 for s in batch.seqs if s.sample}))
    return order


def test_shorter_prompts_run_first_whatever_their_arrival():
    assert first_scheduled_order([30, 5, 12, 3, 20]) == [3, 1, 2, 4, 0]


def test_equal_lengths_keep_their_arrival_order():
    assert first_scheduled_order([6, 2, 6, 2, 2]) == [1, 3, 4, 0, 2]


@pytest.mark.anyio
async def test_a_deployment_serves_requests_with_it(tiny_engine):
    async with run_deployment(tiny_engine.spec(batch_scheduler="shortest-prompt-first")) as deployment:
        outputs = [await deployment.generate(list(range(10, 10 + n)), max_tokens=3, ignore_eos=True) for n in (8, 2)]
        [scheduler] = deployment.batch_schedulers()
    assert isinstance(scheduler, ShortestPromptFirstScheduler)
    assert [len(o.output_token_ids) for o in outputs] == [3, 3] and {o.finish_reason for o in outputs} == {"length"}
