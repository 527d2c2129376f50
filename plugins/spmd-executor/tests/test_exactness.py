"""Greedy tokens equal HF ``generate(do_sample=False)`` on tiny Llama and Qwen2 checkpoints,
through every path of the paged attention: mixed batches, chunked prefill, sequences joining
mid-flight, prefix-cache hits, copy-on-write block copies and KV export/import."""

from __future__ import annotations

import pytest
from spmd_helpers import Driver, hf_greedy, random_prompt

from flowserve_core.types import DeploymentSpec
from flowserve_spmd_executor.executor import SpmdExecutor

pytestmark = pytest.mark.anyio


def make_executor(model, **overrides) -> SpmdExecutor:
    fields = dict(model=str(model), dtype="float32", device="cpu", kv_cache_memory="8MiB", block_size=16)
    fields.update(overrides)
    return SpmdExecutor(DeploymentSpec(**fields))


@pytest.fixture(scope="module")
def llama(tiny_llama):
    executor = make_executor(tiny_llama)
    yield executor
    executor.close()


@pytest.fixture(scope="module")
def qwen2(tiny_qwen2):
    executor = make_executor(tiny_qwen2)
    yield executor
    executor.close()


LENGTHS = [1, 2, 7, 16, 17, 33, 100, 300]


async def test_a_mixed_batch_of_prompts_from_1_to_300_tokens_matches_hf(llama, hf_llama):
    driver = Driver(llama)
    prompts = {f"len{n}": random_prompt(n, seed=n) for n in LENGTHS}
    for seq_id, prompt in prompts.items():
        driver.add(seq_id, prompt, max_tokens=10)
    outputs = await driver.run()
    for seq_id, prompt in prompts.items():
        assert outputs[seq_id] == hf_greedy(hf_llama, prompt, 10), seq_id


async def test_chunked_prefill_with_decodes_and_a_sequence_joining_mid_flight(llama, hf_llama):
    driver = Driver(llama)
    long, short, late = random_prompt(150, seed=11), random_prompt(20, seed=12), random_prompt(57, seed=13)
    driver.add("long", long, max_tokens=12)
    driver.add("short", short, max_tokens=12)
    for _ in range(3):  # "long" is prefilled 40 tokens a step while "short" already decodes
        await driver.step(chunk=40)
    assert driver.seqs["long"].computed == 120 and not driver.seqs["long"].output
    assert len(driver.seqs["short"].output) == 3
    driver.add("late", late, max_tokens=12)
    outputs = await driver.run(chunk=40)
    assert outputs["long"] == hf_greedy(hf_llama, long, 12)
    assert outputs["short"] == hf_greedy(hf_llama, short, 12)
    assert outputs["late"] == hf_greedy(hf_llama, late, 12)


async def test_a_prefix_already_in_the_cache_gives_the_same_tokens_as_a_cold_start(llama, hf_llama):
    driver = Driver(llama)
    first = random_prompt(70, seed=21)
    driver.add("first", first, max_tokens=6)
    await driver.run()
    second = first[:48] + random_prompt(30, seed=22)
    hit = driver.add("hit", second, max_tokens=10, shared_blocks=driver.seqs["first"].table[:3])
    await driver.step()
    assert hit.computed == len(second)
    outputs = await driver.run()
    cold = Driver(llama, first_block=driver.next_block)
    cold.add("cold", second, max_tokens=10)
    assert outputs["hit"] == (await cold.run())["cold"] == hf_greedy(hf_llama, second, 10)


async def test_block_copies_fork_a_sequence(llama, hf_llama):
    driver = Driver(llama)
    prompt = random_prompt(40, seed=31)  # 2.5 blocks: the last one is shared while partial
    parent = driver.add("parent", prompt, max_tokens=9)
    await driver.step()
    child = driver.add("child", prompt, max_tokens=9)
    child.output, child.computed = list(parent.output), parent.computed
    copy = driver.allocate(1)[0]
    child.table = parent.table[:2] + [copy]
    batch = driver.batch()
    batch.block_copies = [(parent.table[2], copy)]
    driver.apply(batch, await llama.execute(batch))
    outputs = await driver.run()
    assert outputs["child"] == outputs["parent"] == hf_greedy(hf_llama, prompt, 9)


async def test_exported_kv_imported_elsewhere_continues_the_same_sequence(llama, hf_llama):
    driver = Driver(llama)
    prompt = random_prompt(45, seed=41)
    source = driver.add("source", prompt, max_tokens=10)
    for _ in range(3):
        await driver.step()
    data = llama.export_kv(source.table)
    layers, two, block_size, heads, head_dim = llama.kv_block_shape
    assert data.nbytes == layers * two * len(source.table) * block_size * heads * head_dim * 4
    copy = driver.add("copy", prompt, max_tokens=10)
    copy.output, copy.computed = list(source.output), source.computed
    copy.table = driver.allocate(len(source.table))
    llama.import_kv(copy.table, data)
    assert bytes(llama.export_kv(copy.table)) == bytes(data)
    outputs = await driver.run()
    assert outputs["copy"] == outputs["source"] == hf_greedy(hf_llama, prompt, 10)
    # A receiver may import a subset (the blocks its prefix cache lacks), never more blocks
    # than were exported, nor a payload that is not whole blocks.
    with pytest.raises(ValueError, match="bytes"):
        llama.import_kv(copy.table * 2, data)
    with pytest.raises(ValueError, match="bytes"):
        llama.import_kv(copy.table, bytes(data)[:-4])


async def test_an_import_reads_only_the_blocks_it_needs_from_a_read_only_mapping(llama, hf_llama, tmp_path):
    # PD decode side: the handoff is a read-only mapping (transport shm) of every exported
    # block; the receiver holds all but the last in its prefix cache and imports that one.
    import mmap
    import tracemalloc

    driver = Driver(llama)
    prompt = random_prompt(300, seed=43)  # 19 blocks, the last one partial
    source = driver.add("source", prompt, max_tokens=8)
    await driver.step()
    assert source.computed == 300 and len(source.table) == 19
    path = tmp_path / "handoff"
    path.write_bytes(llama.export_kv(source.table))
    with open(path, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mapped)
    copy = driver.add("copy", prompt, max_tokens=8, shared_blocks=source.table[:18])  # a prefix-cache hit
    last = driver.allocate(1)
    tracemalloc.start()
    try:
        llama.import_kv(last, view, first_block=18)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    per_block = view.nbytes // 19
    assert peak < 3 * per_block, f"importing one block of {per_block} bytes peaked at {peak} bytes"
    assert bytes(llama.export_kv(last)) == bytes(llama.export_kv(source.table[18:]))
    copy.table, copy.computed, copy.output = copy.table + last, source.computed, list(source.output)
    outputs = await driver.run()
    assert outputs["copy"] == outputs["source"] == hf_greedy(hf_llama, prompt, 8)
    view.release()
    mapped.close()


async def test_qwen2_with_qkv_bias_and_tied_embeddings_matches_hf(qwen2, hf_qwen2):
    driver = Driver(qwen2)
    prompts = {f"len{n}": random_prompt(n, seed=100 + n) for n in (1, 9, 64, 130)}
    for seq_id, prompt in prompts.items():
        driver.add(seq_id, prompt, max_tokens=10)
    outputs = await driver.run(chunk=48)
    for seq_id, prompt in prompts.items():
        assert outputs[seq_id] == hf_greedy(hf_qwen2, prompt, 10), seq_id


async def test_a_bad_batch_fails_with_a_message_naming_the_sequence(llama):
    driver = Driver(llama)
    driver.add("s", random_prompt(40, seed=5), max_tokens=2)
    batch = driver.batch()
    batch.seqs[0].block_table = batch.seqs[0].block_table[:1]
    with pytest.raises(ValueError, match="sequence s: 1 KV blocks"):
        await llama.execute(batch)


async def test_kv_cache_spec_follows_the_memory_budget(llama, tiny_llama):
    spec = llama.kv_cache_spec()
    # 3 layers × K and V × 16 tokens × 2 KV heads × 16 dims × 4 bytes
    assert spec.bytes_per_block == 3 * 2 * 16 * 2 * 16 * 4
    assert spec.num_blocks == (8 << 20) // spec.bytes_per_block
    assert spec.block_size == 16 and spec.max_model_len == 1024
    small = make_executor(tiny_llama, kv_cache_memory="1MiB", max_model_len=256)
    try:
        assert small.kv_cache_spec().num_blocks == (1 << 20) // spec.bytes_per_block
        assert small.kv_cache_spec().max_model_len == 256
    finally:
        small.close()
