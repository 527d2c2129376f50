"""Tests of batch scheduler ``my-scheduler``, written with FlowServe's plugin test kit."""

import pytest

from flowserve_core.testing import check_batch_scheduler, plugin_manager, run_deployment

from flowserve_my_scheduler.plugin import MyScheduler


def test_the_installed_distribution_registers_my_scheduler():
    component = plugin_manager("flowserve-my-scheduler").get("batch_scheduler", "my-scheduler")
    assert component.factory is MyScheduler


def test_my_scheduler_passes_the_batch_scheduler_conformance_suite():
    check_batch_scheduler(MyScheduler)


@pytest.mark.anyio
async def test_a_deployment_schedules_its_requests_with_my_scheduler(tiny_engine):
    async with run_deployment(tiny_engine.spec(batch_scheduler="my-scheduler")) as deployment:
        output = await deployment.generate([10, 11, 12, 13], max_tokens=4, ignore_eos=True)
        [scheduler] = deployment.batch_schedulers()
    assert output.finish_reason == "length" and len(output.output_token_ids) == 4
    assert isinstance(scheduler, MyScheduler) and scheduler.num_queued == 1
