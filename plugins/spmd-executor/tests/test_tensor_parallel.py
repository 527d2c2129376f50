"""Tensor parallelism over real worker processes (gloo on CPU): the same greedy tokens as HF,
KV export in a layout independent of the sharding, and a dead or hung rank turns into
``EngineDeadError`` within a bounded time instead of a hang."""

from __future__ import annotations

import os
import signal

import anyio
import pytest
import torch
from spmd_helpers import Driver, hf_greedy, random_prompt

from flowserve_core.errors import ConfigError, EngineDeadError
from flowserve_core.types import DeploymentSpec, StepBatch
from flowserve_spmd_executor.executor import SpmdExecutor

pytestmark = pytest.mark.anyio


def make_executor(model, tensor_parallel: int = 2, **options) -> SpmdExecutor:
    return SpmdExecutor(DeploymentSpec(model=str(model), dtype="float32", device="cpu", kv_cache_memory="4MiB",
                                       block_size=16, tensor_parallel=tensor_parallel, options=options))


@pytest.fixture(scope="module")
def tp_llama(tiny_llama):
    executor = make_executor(tiny_llama)
    yield executor
    executor.close()


async def test_two_ranks_give_hf_tokens_with_chunked_prefill_and_decodes(tp_llama, hf_llama):
    assert tp_llama.kv_cache_spec().bytes_per_block == 3 * 2 * 16 * 1 * 16 * 4  # one KV head per rank
    driver = Driver(tp_llama)
    prompts = {f"len{n}": random_prompt(n, seed=200 + n) for n in (1, 17, 100, 300)}
    for seq_id, prompt in list(prompts.items())[:3]:
        driver.add(seq_id, prompt, max_tokens=10)
    await driver.step(chunk=64)
    driver.add("len300", prompts["len300"], max_tokens=10)
    outputs = await driver.run(chunk=64)
    for seq_id, prompt in prompts.items():
        assert outputs[seq_id] == hf_greedy(hf_llama, prompt, 10), seq_id


async def test_kv_export_layout_does_not_depend_on_the_sharding(tp_llama, tiny_llama, hf_llama):
    prompt = random_prompt(40, seed=300)
    single = make_executor(tiny_llama, tensor_parallel=1)
    try:
        exports = []
        for executor in (single, tp_llama):
            driver = Driver(executor)
            driver.add("x", prompt, max_tokens=1)
            await driver.run()
            data = torch.frombuffer(bytearray(executor.export_kv(driver.seqs["x"].table)), dtype=torch.float32)
            exports.append((data, driver))
        layers, two, block_size, heads, head_dim = single.kv_block_shape
        tokens = [data.view(layers, two, -1, heads, head_dim)[:, :, :len(prompt)] for data, _ in exports]
        # The slots past the prompt hold whatever earlier tests left there; the prompt's agree.
        assert torch.allclose(tokens[0], tokens[1], atol=1e-4)
    finally:
        single.close()
    # The single rank's blocks, imported into both ranks, continue the sequence.
    driver = exports[1][1]
    source = driver.seqs["x"]
    copy = driver.add("copy", prompt, max_tokens=8)
    copy.output, copy.computed = list(source.output), source.computed
    copy.table = driver.allocate(len(source.table))
    tp_llama.import_kv(copy.table, exports[0][0].numpy().tobytes())
    assert (await driver.run())["copy"] == hf_greedy(hf_llama, prompt, 8)


async def test_fewer_kv_heads_than_ranks_are_replicated(tiny_qwen2, hf_qwen2):
    executor = make_executor(tiny_qwen2)  # 1 KV head, 2 ranks
    try:
        driver = Driver(executor)
        prompts = {f"len{n}": random_prompt(n, seed=400 + n) for n in (3, 50)}
        for seq_id, prompt in prompts.items():
            driver.add(seq_id, prompt, max_tokens=10)
        outputs = await driver.run(chunk=32)
        for seq_id, prompt in prompts.items():
            assert outputs[seq_id] == hf_greedy(hf_qwen2, prompt, 10), seq_id
    finally:
        executor.close()


async def test_a_killed_worker_rank_makes_execute_raise_engine_dead(tiny_llama):
    executor = make_executor(tiny_llama)
    try:
        driver = Driver(executor)
        driver.add("x", random_prompt(10, seed=1), max_tokens=50)
        await driver.step()
        worker = executor._gang.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
        with anyio.fail_after(30):
            with pytest.raises(EngineDeadError, match="rank 1 died.*signal 9"):
                await driver.step()
            with pytest.raises(EngineDeadError):  # and from then on, at once
                await executor.execute(StepBatch())
    finally:
        executor.close()


async def test_a_hung_worker_rank_times_out_into_engine_dead(tiny_llama):
    executor = make_executor(tiny_llama, collective_timeout_seconds=3)
    worker = executor._gang.processes[0]
    try:
        driver = Driver(executor)
        driver.add("x", random_prompt(10, seed=1), max_tokens=50)
        await driver.step()
        os.kill(worker.pid, signal.SIGSTOP)
        with anyio.fail_after(30):
            with pytest.raises(EngineDeadError, match="tensor-parallel"):
                await driver.step()
    finally:
        os.kill(worker.pid, signal.SIGCONT)
        executor.close()
    assert worker.poll() is not None  # close() stopped it


def test_a_worker_rank_that_cannot_load_reports_its_own_error(tiny_llama):
    from flowserve_spmd_executor.gang import WorkerGang, WorkerStartError
    from flowserve_spmd_executor.loader import ResolvedWeights
    from flowserve_spmd_executor.rank import RankSetup

    setup = RankSetup(spec=DeploymentSpec(model=str(tiny_llama)), rank=1, world_size=2, device_type="cpu",
                      device_index=0, dtype="float32", num_blocks=4, max_model_len=64,
                      weights=ResolvedWeights(directory=str(tiny_llama / "missing"), files=[], source="x"))
    gang = WorkerGang([setup])
    try:
        with pytest.raises(WorkerStartError, match="rank 1 failed while loading.*missing/config.json"):
            gang.wait_ready(timeout=120)
    finally:
        gang.close()
    assert gang.processes[0].poll() is not None


def test_a_tensor_parallel_size_that_does_not_divide_the_heads_is_refused(tiny_llama):
    with pytest.raises(ConfigError, match="tensor_parallel=3 does not divide the model's 4 attention heads"):
        make_executor(tiny_llama, tensor_parallel=3)
