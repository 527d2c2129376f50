"""``pd-hybrid`` under load: short prompts stay colocated until the colocated instance decodes
more sequences than a decode instance, then take the disaggregated path; every answer is
HF-exact whichever path it took."""

from __future__ import annotations

import anyio
import pytest

from flowserve_core.types import DeploymentSpec, TaskRole

torch = pytest.importorskip("torch")
pytest.importorskip("flowserve_spmd_executor")

from flowserve_testing import hf_greedy, run_deployment, write_tiny_llama  # noqa: E402  (after the importorskip above)

pytestmark = pytest.mark.anyio
NEW = 150


async def test_short_prompts_spill_to_the_disaggregated_path_when_the_colocated_pool_is_busier(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny", num_hidden_layers=2, seed=17)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    spec = DeploymentSpec(name="tiny", model=str(path), tokenizer="hf", executor="spmd", kv_cache="paged",
                          batch_scheduler="continuous", job_scheduler="pd-hybrid", scaler="inproc", dtype="float32",
                          device="cpu", kv_cache_memory="8MiB", colocated_instances=1, prefill_instances=1,
                          decode_instances=1)
    prompts = [[(13 * i + j) % 250 + 3 for j in range(6 + i)] for i in range(6)]
    outputs: list = [None] * len(prompts)
    async with run_deployment(spec) as runner:
        scheduler, pool = runner.deployment.job_scheduler, runner.deployment.pool
        instances = pool.instances
        with anyio.fail_after(120):
            # run_deployment waits for one ready instance; the choice needs all three pools
            # (a pool not yet ready sends every request to the one that is).
            while len(pool.ready()) < 3:
                await pool.wait_changed()

        async def one(i: int) -> None:
            outputs[i] = await runner.generate(prompts[i], max_tokens=NEW, temperature=0.0, ignore_eos=True)

        async with anyio.create_task_group() as group:
            for i in range(len(prompts)):
                # One after another, each once the earlier ones sit on their instances (and,
                # NEW tokens long, still decode there when the next one is routed).
                group.start_soon(one, i)
                with anyio.fail_after(60):
                    while sum(scheduler.chosen.values()) <= i or \
                            sum(x.num_tasks for x in list(instances.values())) <= i:
                        await anyio.sleep(0.001)
        chosen = dict(runner.deployment.job_scheduler.chosen)
    assert chosen[TaskRole.COLOCATED] >= 1 and chosen[TaskRole.PREFILL] >= 1, chosen
    assert sum(chosen.values()) == len(prompts)
    for prompt, output in zip(prompts, outputs):
        assert output.output_token_ids == hf_greedy(model, prompt, NEW), output.error
