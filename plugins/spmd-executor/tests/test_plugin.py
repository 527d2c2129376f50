"""The plugin as FlowServe sees it: registered by name through its entry point, built by the
kernel's PluginManager, light to import, and honouring the Executor protocol."""

from __future__ import annotations

import subprocess
import sys
import threading

import anyio
import pytest
from spmd_helpers import random_prompt

from flowserve_core.interfaces import Executor
from flowserve_core.types import DeploymentSpec, ScheduledSequence, StepBatch

pytestmark = pytest.mark.anyio


def test_importing_the_hook_module_stays_light():
    code = ("import sys, flowserve_spmd_executor.plugin; "
            "heavy = [m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_the_kernel_builds_spmd_by_name_and_it_runs_off_the_event_loop(pm, tiny_llama):
    component = pm.get("executor", "spmd")
    assert component.distribution == "flowserve-spmd-executor"
    spec = DeploymentSpec(model=str(tiny_llama), dtype="float32", kv_cache_memory="2MiB")
    executor = await anyio.to_thread.run_sync(pm.build, "executor", "spmd", spec)
    try:
        assert isinstance(executor, Executor)
        prompt = random_prompt(200, seed=1)
        batch = StepBatch(seqs=[ScheduledSequence(seq_id="s", token_ids=prompt, start_pos=0,
                                                  block_table=list(range(13)), prompt_token_ids=prompt)])
        threads: list[int] = []
        forward = executor.rank.run

        def recording_forward(plan):
            threads.append(threading.get_ident())
            return forward(plan)

        executor.rank.run = recording_forward
        result = await executor.execute(batch)
        assert set(result.token_ids) == {"s"}
        assert threads and threads[0] != threading.get_ident()  # computed off the event loop
    finally:
        executor.close()
