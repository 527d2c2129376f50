"""``pd_on_failure`` both ways for both roles, in process (scaler ``inproc``) with the toy
``counter`` executor: an instance whose engine dies under a prefill or a decode task either
fails the request with an error (``fail``) or has the task rerouted (``reroute``); no request
hangs, and the deployment serves the next request. (The live tests, ``test_pd_live.py`` and
``test_pd_prefill_failure.py``, SIGKILL real instance processes for decode/reroute and
prefill/fail; these cover the other two combinations.)"""

from __future__ import annotations

import types

import anyio
import pytest

from flowserve_core import hookimpl
from flowserve_core.deployment import Deployment
from flowserve_core.errors import EngineDeadError
from flowserve_core.types import Request, SamplingParams, TaskRole
from flowserve_test_fixtures import CounterExecutor, toy_spec

pytestmark = pytest.mark.anyio


def dying_executor(role: TaskRole, deaths: list[str]):
    """A counter executor whose engine dies on the first step it runs for a task of ``role``
    (once in the whole deployment): a decode task's steps carry the prefill's first token, a
    prefill task's do not."""

    class DiesOnce(CounterExecutor):
        async def execute(self, batch):
            decoding = any(s.output_token_ids for s in batch.seqs)
            if not deaths and decoding == (role is TaskRole.DECODE):
                deaths.append(role.value)
                raise EngineDeadError(f"injected death under a {role.value} task")
            return await super().execute(batch)

    return DiesOnce


async def run(role: TaskRole, on_failure: str):
    """One request through a deployment whose ``role`` instance dies under it, then another."""
    from flowserve_core.plugins import PluginManager

    pm = PluginManager()
    deaths: list[str] = []
    factory = dying_executor(role, deaths)
    pm.register(types.SimpleNamespace(flowserve_register_executors=hookimpl(
        lambda register: register("dies-once", factory))), name="test-executor-dies-once")
    spec = toy_spec(executor="dies-once", kv_cache="paged", batch_scheduler="continuous",
                    job_scheduler="pd-disaggregated", prefill_instances=2, decode_instances=2,
                    options={"pd_on_failure": on_failure})
    deployment = Deployment(spec, pm)
    outputs = []
    async with anyio.create_task_group() as group:
        await group.start(deployment.run)
        with anyio.fail_after(60):  # never hangs
            while len(deployment.pool.ready()) < 4:
                await deployment.pool.wait_changed()
            for prompt in ([5, 6, 7], [20, 21]):
                tokens = []
                async with deployment.open(Request(prompt_token_ids=prompt,
                                                   params=SamplingParams(max_tokens=6))) as handle:
                    async for event in handle:
                        tokens.extend(event.token_ids)
                outputs.append((tokens, handle.output))
        group.cancel_scope.cancel()
    assert deaths == [role.value]
    return outputs


async def test_decode_death_with_reroute_finishes_the_request_exactly():
    (tokens, output), (after, _) = await run(TaskRole.DECODE, "reroute")
    assert output.finish_reason == "length", output.error
    assert tokens == [8, 9, 10, 11, 12, 13]  # the counter's tokens, none repeated or lost
    assert after == [22, 23, 24, 25, 26, 27]


async def test_decode_death_with_fail_ends_the_request_with_the_error():
    (tokens, output), (after, next_output) = await run(TaskRole.DECODE, "fail")
    assert output.finish_reason == "error" and "injected death under a decode task" in output.error
    assert tokens[:1] == [8] and len(tokens) < 6  # the prefill's token came; the rest did not
    assert next_output.finish_reason == "length" and after == [22, 23, 24, 25, 26, 27]


async def test_prefill_death_with_reroute_runs_the_prefill_elsewhere():
    (tokens, output), (after, _) = await run(TaskRole.PREFILL, "reroute")
    assert output.finish_reason == "length", output.error
    assert tokens == [8, 9, 10, 11, 12, 13]
    assert after == [22, 23, 24, 25, 26, 27]


async def test_prefill_death_with_fail_ends_the_request_naming_the_instance():
    (tokens, output), (after, next_output) = await run(TaskRole.PREFILL, "fail")
    assert tokens == [] and output.finish_reason == "error"
    assert "prefill instance" in output.error and "died" in output.error
    assert next_output.finish_reason == "length" and after == [22, 23, 24, 25, 26, 27]
