"""Embeddings (``ScheduledSequence.pooling``): the executor's pooled vectors are transformers'
``last_hidden_state`` (after the final norm) pooled the same way and L2-normalized, whether
the prompt is computed in one step or in chunks, alongside generation, and at TP=2."""

from __future__ import annotations

import anyio
import pytest
import torch
from spmd_helpers import hf_greedy, random_prompt

from flowserve_core.types import DeploymentSpec, PoolingParams, SamplingParams, ScheduledSequence, StepBatch
from flowserve_spmd_executor.executor import SpmdExecutor

pytestmark = pytest.mark.anyio


def make_executor(model, tensor_parallel: int = 1) -> SpmdExecutor:
    return SpmdExecutor(DeploymentSpec(model=str(model), dtype="float32", device="cpu", kv_cache_memory="4MiB",
                                       block_size=16, tensor_parallel=tensor_parallel))


@pytest.fixture(scope="module")
def llama(tiny_llama):
    executor = make_executor(tiny_llama)
    yield executor
    executor.close()


def hf_embedding(hf_model, prompt: list[int], kind: str, dimensions: int | None = None) -> torch.Tensor:
    """The oracle: transformers' final hidden states (``last_hidden_state``), pooled, cut, normalized."""
    with torch.no_grad():
        hidden = hf_model.model(torch.tensor([prompt])).last_hidden_state[0]
    vector = hidden[-1] if kind == "last" else hidden.mean(0)
    return torch.nn.functional.normalize(vector[:dimensions], dim=0)


async def embed(executor, prompts: dict[str, list[int]], pooling: PoolingParams, chunk: int,
                generate: list[int] | None = None) -> tuple[dict[str, list[float]], int | None]:
    """Run ``prompts`` as embeddings, at most ``chunk`` tokens of each per step (and, in the
    first step, the prompt ``generate`` sampled once); their vectors and that token."""
    block_size = executor.kv_cache_spec().block_size
    tables: dict[str, list[int]] = {}
    computed = dict.fromkeys(prompts, 0)
    vectors: dict[str, list[float]] = {}
    token = None
    next_block = 0
    while len(vectors) < len(prompts):
        seqs = []
        for seq_id, prompt in prompts.items():
            if seq_id in vectors:
                continue
            start = computed[seq_id]
            tokens = prompt[start:start + chunk]
            table = tables.setdefault(seq_id, [])
            while len(table) * block_size < start + len(tokens):
                table.append(next_block)
                next_block += 1
            seqs.append(ScheduledSequence(seq_id=seq_id, token_ids=tokens, start_pos=start, block_table=list(table),
                                          sample=start + len(tokens) == len(prompt), prompt_token_ids=prompt,
                                          pooling=pooling))
        if generate is not None and token is None:
            blocks = list(range(next_block, next_block + -(-len(generate) // block_size)))
            next_block += len(blocks)
            seqs.append(ScheduledSequence(seq_id="generate", token_ids=generate, start_pos=0, block_table=blocks,
                                          params=SamplingParams(temperature=0.0), prompt_token_ids=generate))
        result = await executor.execute(StepBatch(seqs=seqs))
        for seq in seqs:
            if seq.seq_id == "generate":
                token = result.token_ids["generate"]
                continue
            assert seq.seq_id not in result.token_ids, "an embedding was sampled"
            computed[seq.seq_id] += len(seq.token_ids)
            if seq.sample:
                vectors[seq.seq_id] = result.embeddings[seq.seq_id]
            else:
                assert seq.seq_id not in result.embeddings
    await executor.execute(StepBatch(finished_seq_ids=[*vectors, "generate"]))
    return vectors, token


@pytest.mark.parametrize("kind", ["last", "mean"])
async def test_pooled_vectors_are_transformers_hidden_states_whole_and_chunked(llama, hf_llama, kind):
    prompts = {f"len{n}": random_prompt(n, seed=500 + n) for n in (1, 5, 40, 150)}
    for chunk in (1 << 30, 32):  # one step each, then 32-token chunks (150 tokens: five of them)
        vectors, _ = await embed(llama, prompts, PoolingParams(kind=kind), chunk)
        for seq_id, prompt in prompts.items():
            got = torch.tensor(vectors[seq_id])
            assert got.shape == (64,)
            assert abs(got.norm().item() - 1.0) < 1e-5
            torch.testing.assert_close(got, hf_embedding(hf_llama, prompt, kind), atol=1e-4, rtol=1e-4)


async def test_dimensions_cut_before_normalizing_and_generation_shares_the_step(llama, hf_llama):
    prompt, other = random_prompt(30, seed=601), random_prompt(20, seed=602)
    vectors, token = await embed(llama, {"e": prompt}, PoolingParams(kind="mean", dimensions=16), chunk=7,
                                 generate=other)
    assert token == hf_greedy(hf_llama, other, 1)[0]
    torch.testing.assert_close(torch.tensor(vectors["e"]), hf_embedding(hf_llama, prompt, "mean", 16),
                               atol=1e-4, rtol=1e-4)
    raw, _ = await embed(llama, {"e": prompt}, PoolingParams(kind="last", normalize=False), chunk=64)
    with torch.no_grad():
        hidden = hf_llama.model(torch.tensor([prompt])).last_hidden_state[0, -1]
    torch.testing.assert_close(torch.tensor(raw["e"]), hidden, atol=1e-4, rtol=1e-4)


async def test_two_tensor_parallel_ranks_give_the_same_vectors(tiny_llama, hf_llama):
    executor = await anyio.to_thread.run_sync(make_executor, tiny_llama, 2)
    try:
        prompts = {"a": random_prompt(70, seed=701), "b": random_prompt(9, seed=702)}
        for kind in ("last", "mean"):
            vectors, _ = await embed(executor, prompts, PoolingParams(kind=kind), chunk=32)
            for seq_id, prompt in prompts.items():
                torch.testing.assert_close(torch.tensor(vectors[seq_id]), hf_embedding(hf_llama, prompt, kind),
                                           atol=1e-4, rtol=1e-4)
    finally:
        executor.close()


async def test_mean_pooling_survives_preemption_in_a_deployment(tmp_path):
    """Through the continuous scheduler: two generations that grow past a small KV cache
    preempt a later mean-pooled prompt in the middle of its chunks; it is recomputed from the
    start and its sum starts afresh (``Pooler`` forgets a preempted sequence), so its vector is
    still exact, and so are the generations."""
    from transformers import AutoModelForCausalLM

    from flowserve_core.types import Request
    from flowserve_testing import run_deployment, write_tiny_llama

    path = write_tiny_llama(tmp_path / "tiny", seed=3)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    vocab = hf.config.vocab_size
    generate = [random_prompt(16, seed=810 + i, vocab=vocab) for i in range(2)]
    embedded = [random_prompt(100, seed=820 + i, vocab=vocab) for i in range(2)]
    # 12 blocks of 16: the generations hold 2 blocks each, growing to 4 (16 + 40 tokens); an
    # embedding needs 7, so it cannot finish beside both: 8 + 7 > 12. Six tokens a step (two
    # decodes, four of a prompt) keep its prompt under way when they grow.
    spec = DeploymentSpec(model=str(path), executor="spmd", scaler="inproc", dtype="float32", device="cpu",
                          kv_cache_memory="96KiB", block_size=16, max_num_batched_tokens=6)
    vectors: list = [None] * len(embedded)
    outputs: list = [None] * len(generate)
    async with run_deployment(spec) as runner:
        (scheduler,) = runner.batch_schedulers()
        assert scheduler.total_blocks == 12

        async def gen(i: int) -> None:
            outputs[i] = await runner.generate(generate[i], max_tokens=40, temperature=0.0, ignore_eos=True)

        async def one(i: int) -> None:
            request = Request(prompt_token_ids=embedded[i], pooling=PoolingParams(kind="mean"))
            async with runner.deployment.open(request) as handle:
                async for event in handle:
                    vectors[i] = event.embedding or vectors[i]
            assert handle.output.finish_reason == "stop", handle.output.error

        async with anyio.create_task_group() as group:
            for i in range(len(generate)):
                group.start_soon(gen, i)
            with anyio.fail_after(30):  # the embeddings arrive later: they are the ones preempted
                while scheduler.stats().num_running < len(generate):
                    await anyio.sleep(0.001)
            for i in range(len(embedded)):
                group.start_soon(one, i)
        assert scheduler.stats().num_preemptions > 0
    for prompt, output in zip(generate, outputs):
        assert output.output_token_ids == hf_greedy(hf, prompt, 40)
    for prompt, vector in zip(embedded, vectors):
        torch.testing.assert_close(torch.tensor(vector), hf_embedding(hf, prompt, "mean"), atol=1e-4, rtol=1e-4)
