"""The whole engine against the oracle: hf + spmd + paged + continuous + colocated must give
exactly HF transformers' greedy tokens, whatever the batching, chunking, prefix caching and
preemption do. (The executor alone is tested in plugins/spmd-executor.)"""

from __future__ import annotations

import random

import anyio
import pytest

from flowserve_core.types import DeploymentSpec

pytest.importorskip("flowserve_spmd_executor")
pytest.importorskip("flowserve_colocated")
pytest.importorskip("flowserve_paged_kv")
pytest.importorskip("flowserve_hf_tokenizer")
torch = pytest.importorskip("torch")

from flowserve_testing import hf_greedy, run_deployment, write_tiny_llama  # noqa: E402  (after the importorskip above)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), num_hidden_layers=3, seed=3)
    from transformers import AutoModelForCausalLM

    return path, AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()




def spec(path, **overrides) -> DeploymentSpec:
    fields = dict(name="tiny", model=str(path), tokenizer="hf", executor="spmd", kv_cache="paged",
                  batch_scheduler="continuous", job_scheduler="colocated", scaler="inproc",
                  dtype="float32", device="cpu", kv_cache_memory="8MiB", max_num_batched_tokens=64)
    fields.update(overrides)
    return DeploymentSpec(**fields)


def prompts(count: int, lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(lengths[i % len(lengths)])] for i in range(count)]


async def run_all(runner, jobs: list[tuple[list[int], int]], stagger: float = 0.0) -> list:
    """Run every (prompt, new_tokens) at once, the later ones arriving mid-flight."""
    outputs: list = [None] * len(jobs)

    async def one(i: int) -> None:
        await anyio.sleep(stagger * i)
        prompt, new = jobs[i]
        outputs[i] = await runner.generate(prompt, max_tokens=new, temperature=0.0, ignore_eos=True)

    async with anyio.create_task_group() as tg:
        for i in range(len(jobs)):
            tg.start_soon(one, i)
    return outputs


async def test_mixed_prompt_lengths_arriving_mid_flight_match_hf_exactly(tiny):
    path, model = tiny
    lengths = [1, 7, 16, 17, 45, 64, 100, 150, 300, 3, 33, 250]
    jobs = [(p, 12) for p in prompts(12, lengths, model.config.vocab_size, seed=1)]
    async with run_deployment(spec(path)) as runner:
        outputs = await run_all(runner, jobs, stagger=0.05)
        (scheduler,) = runner.batch_schedulers()
    for (prompt, new), output in zip(jobs, outputs):
        assert output.finish_reason == "length", output.error
        assert output.output_token_ids == hf_greedy(model, prompt, new), f"prompt of {len(prompt)} tokens"


async def test_prefix_cache_hits_give_the_same_tokens_as_a_cold_run(tiny):
    path, model = tiny
    shared = prompts(1, [160], model.config.vocab_size, seed=2)[0]
    tails = prompts(3, [5, 9, 30], model.config.vocab_size, seed=3)
    async with run_deployment(spec(path)) as runner:
        cold = await runner.generate(shared + tails[0], max_tokens=10, temperature=0.0, ignore_eos=True)
        warm = [await runner.generate(shared + tail, max_tokens=10, temperature=0.0, ignore_eos=True)
                for tail in tails]
        (scheduler,) = runner.batch_schedulers()
        usage = scheduler.kv_usage()
    assert cold.num_cached_tokens == 0
    assert all(w.num_cached_tokens >= 160 - 16 for w in warm), [w.num_cached_tokens for w in warm]
    assert usage.prefix_hits > 0
    assert warm[0].output_token_ids == cold.output_token_ids
    for tail, output in zip(tails, warm):
        assert output.output_token_ids == hf_greedy(model, shared + tail, 10)


async def test_preemption_under_a_small_kv_cache_still_matches_hf(tiny):
    path, model = tiny
    jobs = [(p, 24) for p in prompts(10, [40, 60, 20, 75], model.config.vocab_size, seed=4)]
    # 2 KV heads x 16 dims x 3 layers x 16 tokens x 2 (K, V) x 4 bytes = 12 KiB a block: 24 blocks
    async with run_deployment(spec(path, kv_cache_memory="288KiB", max_num_batched_tokens=128)) as runner:
        outputs = await run_all(runner, jobs)
        (scheduler,) = runner.batch_schedulers()
        stats = scheduler.stats()
    assert stats.num_preemptions > 0
    for (prompt, new), output in zip(jobs, outputs):
        assert output.output_token_ids == hf_greedy(model, prompt, new)


async def test_seeded_sampling_reproduces_itself_whatever_else_runs(tiny):
    path, model = tiny
    prompt = prompts(1, [20], model.config.vocab_size, seed=5)[0]
    noise = [(p, 16) for p in prompts(5, [10, 50], model.config.vocab_size, seed=6)]
    params = dict(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    async with run_deployment(spec(path)) as runner:
        alone = await runner.generate(prompt, **params)
        crowd: list = []

        async def seeded() -> None:
            crowd.append(await runner.generate(prompt, **params))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_all, runner, noise)
            tg.start_soon(seeded)
        other_seed = await runner.generate(prompt, **{**params, "seed": 99})
    assert crowd[0].output_token_ids == alone.output_token_ids
    assert other_seed.output_token_ids != alone.output_token_ids
