"""The prewarm scaler's start paths with the ``llamacpp`` executor: forked instances (the
zygote loads the GGUF mmapped and never computes; each child makes its own llama.cpp context
after the fork) and pre-loaded ones decode what llama.cpp itself decodes, without hanging."""

from __future__ import annotations

import random

import anyio
import pytest

pytest.importorskip("flowserve_prewarm_scaler")

from flowserve_core.deployment import Deployment  # noqa: E402  (after the importorskip above)
from flowserve_core.plugins import PluginManager  # noqa: E402  (after the importorskip above)
from flowserve_core.types import DeploymentSpec  # noqa: E402  (after the importorskip above)
from flowserve_llamacpp_executor.testing import llama_cpp_greedy  # noqa: E402  (after the importorskip above)
from flowserve_testing import generate_on  # noqa: E402  (after the importorskip above)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]




@pytest.mark.parametrize("start_path, reported", [("fork", "forked"), ("preload", "preloaded")])
async def test_fast_started_instances_decode_what_llama_cpp_decodes(tiny_llama_gguf, start_path, reported):
    spec = DeploymentSpec(name="gguf", model=str(tiny_llama_gguf), tokenizer="hf", executor="llamacpp",
                          kv_cache="paged", batch_scheduler="continuous", job_scheduler="colocated",
                          scaler="prewarm", kv_cache_memory="16MiB", min_instances=2, max_instances=2,
                          options={"start_path": start_path, "pool_size": 2 if start_path == "preload" else 0,
                                   "autoscale": False})
    deployment = Deployment(spec, PluginManager())
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (100, 7)]  # 100: a multi-threaded prefill
    async with anyio.create_task_group() as group:
        await group.start(deployment.run)
        with anyio.fail_after(240):
            while len(deployment.pool.ready()) < 2:
                await deployment.pool.wait_changed()
        instances = deployment.pool.ready()
        assert {i.info.start_path for i in instances} == {reported}
        with anyio.fail_after(120):  # a ggml thread pool broken by the fork would hang here
            outputs = [await generate_on(instance, prompt, 8) for instance, prompt in zip(instances, prompts)]
        await deployment.stop()
        group.cancel_scope.cancel()
    for prompt, output in zip(prompts, outputs):
        assert output == llama_cpp_greedy(tiny_llama_gguf, prompt, 8)
