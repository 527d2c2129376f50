"""The ``continuous`` batch scheduler against a real ``paged`` KV cache manager, driven by the
toy ``counter`` executor (next token = last + 1) with a simulated KV memory checking every
block table (conftest.KVMemory)."""

from __future__ import annotations

import pytest

from flowserve_colocated import ContinuousBatchScheduler
from flowserve_core.plugins import PluginManager
from flowserve_core.types import (
    DeploymentSpec,
    KVCacheSpec,
    Request,
    SamplingParams,
    StepBatch,
    StepResult,
    StructuredOutput,
    Task,
    TaskRole,
    TokenEvent,
)
from flowserve_paged_kv import PagedKVCacheManager
from flowserve_test_fixtures import CounterExecutor, toy_spec

pytestmark = pytest.mark.anyio

#: these schedulers hand off no KV: asking for a transport would fail, naming it
NO_KV_TRANSPORTS = PluginManager(load_entrypoints=False).kv_transports(DeploymentSpec())


def make(num_blocks: int = 64, block_size: int = 4, max_model_len: int = 256, **spec_fields):
    spec = toy_spec(kv_cache="paged", batch_scheduler="continuous", **spec_fields)
    kv = PagedKVCacheManager(spec, KVCacheSpec(num_blocks=num_blocks, block_size=block_size,
                                               max_model_len=max_model_len))
    return ContinuousBatchScheduler(spec, kv, NO_KV_TRANSPORTS), CounterExecutor(spec)


def task(prompt: list[int], max_tokens: int | None = 4, eos: list[int] | None = None, **params) -> Task:
    request = Request(prompt_token_ids=prompt, eos_token_ids=eos or [],
                      params=SamplingParams(max_tokens=max_tokens, **params))
    return Task(request=request, id=f"t{prompt[0]}-{len(prompt)}")


class Driver:
    """Steps a scheduler and executor the way the engine does, keeping every batch and event."""

    def __init__(self, scheduler, executor, memory):
        self.scheduler, self.executor, self.memory = scheduler, executor, memory
        self.batches: list[StepBatch] = []
        self.events: dict[str, list[TokenEvent]] = {}

    async def step(self) -> StepBatch:
        batch = self.scheduler.schedule()
        assert batch.num_tokens <= self.scheduler.token_budget
        assert len(batch.seqs) <= self.scheduler.max_num_seqs
        self.batches.append(batch)
        if batch.seqs:
            self.memory.run(batch)
            result = await self.executor.execute(batch)
            self.memory.decoded_more(batch, result)
            for event in self.scheduler.update(batch, result):
                self.events.setdefault(event.task_id, []).append(event)
        usage = self.scheduler.kv_usage()
        assert usage.used_blocks + usage.cached_blocks + usage.free_blocks == usage.total_blocks
        return batch

    async def run(self, max_steps: int = 5000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_work():
                return
            await self.step()
        raise AssertionError(f"no end after {max_steps} steps: {self.scheduler.stats()}")

    def tokens(self, task_id: str) -> list[int]:
        return [t for e in self.events.get(task_id, []) for t in e.token_ids]

    def reason(self, task_id: str) -> str | None:
        return self.events[task_id][-1].finish_reason


def driver(kv_memory, **kw) -> Driver:
    scheduler, executor = make(**kw)
    return Driver(scheduler, executor, kv_memory(scheduler.kv))


async def test_decode_first_then_chunked_prefill_within_the_budget(kv_memory):
    d = driver(kv_memory, max_num_batched_tokens=8)
    d.scheduler.add(task([100, 101, 102], max_tokens=10))
    first = await d.step()
    assert [(s.seq_id, s.start_pos, len(s.token_ids), s.sample) for s in first.seqs] == [("t100-3", 0, 3, True)]
    long_prompt = list(range(500, 520))  # 20 tokens: chunks of 7, 7, 6 next to one decode
    d.scheduler.add(task(long_prompt, max_tokens=2))
    shapes = []
    for _ in range(3):
        batch = await d.step()
        decode, chunk = batch.seqs
        assert (decode.seq_id, len(decode.token_ids), decode.sample) == ("t100-3", 1, True)
        shapes.append((chunk.start_pos, len(chunk.token_ids), chunk.sample))
        assert batch.num_tokens == 8 or chunk.sample
    assert shapes == [(0, 7, False), (7, 7, False), (14, 6, True)]
    assert d.tokens("t500-20") == [520]  # sampled once, at the end of the prompt
    assert d.events["t500-20"][0].num_prompt_tokens == 20
    await d.run()
    assert d.tokens("t100-3") == list(range(103, 113)) and d.reason("t100-3") == "length"
    assert d.tokens("t500-20") == [520, 521]


async def test_first_come_first_served_within_max_num_seqs(kv_memory):
    d = driver(kv_memory, max_num_seqs=2)
    for first in (10, 20, 30):
        d.scheduler.add(task([first], max_tokens=3))
    batch = await d.step()
    assert [s.seq_id for s in batch.seqs] == ["t10-1", "t20-1"]
    assert d.scheduler.stats().num_waiting == 1
    await d.run()
    starts = {s.seq_id: i for i, b in reversed(list(enumerate(d.batches))) for s in b.seqs}
    assert starts["t10-1"] == starts["t20-1"] < starts["t30-1"]
    assert d.tokens("t30-1") == [31, 32, 33]


async def test_the_head_of_the_queue_is_not_overtaken(kv_memory):
    # 8 blocks of 4 tokens. A holds 4 of them; B needs 5, so it waits; C would fit but is
    # behind B and must not start first.
    d = driver(kv_memory, num_blocks=8)
    d.scheduler.add(task(list(range(100, 116)), max_tokens=8))
    await d.step()
    d.scheduler.add(task(list(range(200, 218)), max_tokens=2))
    d.scheduler.add(task([300], max_tokens=2))
    batch = await d.step()
    assert [s.seq_id for s in batch.seqs] == ["t100-16"]
    await d.run()
    first_step = {s.seq_id: i for i, b in reversed(list(enumerate(d.batches))) for s in b.seqs}
    assert first_step["t200-18"] <= first_step["t300-1"]
    assert d.tokens("t300-1") == [301, 302] and d.tokens("t200-18") == [218, 219]


async def test_prefix_cache_hits_skip_the_cached_tokens(kv_memory):
    d = driver(kv_memory)
    shared = list(range(600, 616))  # four full blocks of 4
    d.scheduler.add(task(shared + [1, 2], max_tokens=2))
    await d.run()
    d.scheduler.add(task(shared + [7, 8, 9], max_tokens=2))
    batch = await d.step()
    (seq,) = batch.seqs
    assert seq.start_pos == 16 and seq.token_ids == [7, 8, 9]
    await d.run()
    events = d.events["t600-19"]
    assert events[0].num_cached_tokens == 16 and events[-1].num_cached_tokens == 0
    assert d.tokens("t600-19") == [10, 11]
    usage = d.scheduler.kv_usage()
    assert usage.prefix_hits == 16 and usage.prefix_queries == 18 + 19


async def test_preemption_under_a_tiny_cache_finishes_everything_correctly(kv_memory):
    # 6 blocks of 4 tokens = 24 slots for 12 requests that each grow to 16 tokens.
    d = driver(kv_memory, num_blocks=6, max_num_batched_tokens=16)
    prompts = {f"t{70 * i}-5": list(range(70 * i, 70 * i + 5)) for i in range(1, 13)}
    for prompt in prompts.values():
        d.scheduler.add(task(prompt, max_tokens=12))
    await d.run()
    for task_id, prompt in prompts.items():
        assert d.tokens(task_id) == list(range(prompt[-1] + 1, prompt[-1] + 13)), task_id
        assert d.reason(task_id) == "length"
    stats = d.scheduler.stats()
    assert stats.num_preemptions > 0
    assert (stats.num_running, stats.num_waiting, stats.waiting_prefill_tokens) == (0, 0, 0)
    assert d.scheduler.kv_usage().used_blocks == 0
    # A preempted sequence is reported to the executor, then scheduled again from scratch.
    recomputed = {s.seq_id for i, b in enumerate(d.batches) for s in b.seqs
                  if s.start_pos == 0 and any(s.seq_id in e.finished_seq_ids for e in d.batches[:i])}
    assert recomputed


async def test_the_latest_arrival_is_the_one_preempted(kv_memory):
    # 3 blocks of 4. A and B take one block each; at 5 tokens both need a second: A, the
    # earlier, gets the last free block and B gives its own up.
    d = driver(kv_memory, num_blocks=3)
    d.scheduler.add(task([10, 11, 12, 13], max_tokens=8))
    d.scheduler.add(task([20, 21, 22, 23], max_tokens=4))
    await d.step()
    batch = await d.step()
    assert [s.seq_id for s in batch.seqs] == ["t10-4"] and batch.finished_seq_ids == ["t20-4"]
    assert d.scheduler.stats().num_preemptions == 1
    assert d.scheduler.stats().num_waiting == 1
    await d.run()
    assert d.tokens("t10-4") == list(range(14, 22)) and d.tokens("t20-4") == [24, 25, 26, 27]


async def test_a_sequence_that_can_never_fit_is_refused_at_add():
    scheduler, _ = make(num_blocks=4, max_model_len=64)  # 16 slots
    with pytest.raises(ValueError, match=r"up to 19 tokens \(5 blocks of 4\).*has 4 blocks \(16 tokens\)"):
        scheduler.add(task(list(range(10)), max_tokens=10))
    with pytest.raises(ValueError, match="the prompt has 64 tokens but the context length is 64"):
        scheduler.add(task(list(range(64)), max_tokens=1))
    with pytest.raises(ValueError, match="the prompt is empty"):
        scheduler.add(Task(request=Request(prompt_token_ids=[])))
    with pytest.raises(ValueError, match="decode task .* has no first token from its prefill"):
        scheduler.add(Task(role=TaskRole.DECODE, request=Request(prompt_token_ids=[1])))
    # max_tokens=None means "until the context is full": 63 slots here, too many.
    with pytest.raises(ValueError, match="up to 63 tokens"):
        scheduler.add(task([1], max_tokens=None))
    scheduler.add(task(list(range(10)), max_tokens=7))  # 16 slots: fits exactly
    with pytest.raises(ValueError, match="already scheduled"):
        scheduler.add(task(list(range(10))))
    assert scheduler.has_work()


async def test_aborts_free_every_block_and_are_reported_to_the_executor(kv_memory):
    d = driver(kv_memory, num_blocks=16, max_num_batched_tokens=8)
    for first in (100, 200, 300, 400):
        d.scheduler.add(task(list(range(first, first + 6)), max_tokens=50))
    await d.step()
    await d.step()
    running = [s.seq_id for s in d.batches[-1].seqs]
    event = d.scheduler.abort(running[0])
    assert event.finish_reason == "abort" and event.num_prompt_tokens == 6
    assert d.scheduler.abort(running[0]) is None and d.scheduler.abort("nobody") is None
    batch = await d.step()
    assert running[0] in batch.finished_seq_ids
    assert running[0] not in {s.seq_id for s in batch.seqs}
    for task_id in ("t100-6", "t200-6", "t300-6", "t400-6"):
        d.scheduler.abort(task_id)
    assert not d.scheduler.has_work()
    usage = d.scheduler.kv_usage()
    assert usage.used_blocks == 0 and usage.free_blocks + usage.cached_blocks == 16


async def test_finish_reasons_and_min_tokens(kv_memory):
    d = driver(kv_memory, max_model_len=32)
    d.scheduler.add(task([10], max_tokens=20, eos=[13]))  # stops on eos
    d.scheduler.add(task([20], max_tokens=5, eos=[23], ignore_eos=True))  # eos ignored
    d.scheduler.add(task([30], max_tokens=20, stop_token_ids=[32, 34]))  # stop token
    d.scheduler.add(task([40], max_tokens=20, eos=[41], min_tokens=3, stop_token_ids=[42]))
    d.scheduler.add(task([50], max_tokens=None))  # until the context (32 tokens) is full
    d.scheduler.add(task([60, 61, 62], max_tokens=2, logprobs=1))
    await d.run()
    assert (d.tokens("t10-1"), d.reason("t10-1")) == ([11, 12, 13], "stop")
    assert (d.tokens("t20-1"), d.reason("t20-1")) == ([21, 22, 23, 24, 25], "length")
    assert (d.tokens("t30-1"), d.reason("t30-1")) == ([31, 32], "stop")
    # 41 and 42 are stop tokens, but the first two tokens may not stop: the third does not
    # stop either (43), so it runs to max_tokens.
    assert (d.tokens("t40-1"), d.reason("t40-1")) == (list(range(41, 61)), "length")
    assert (d.tokens("t50-1"), d.reason("t50-1")) == (list(range(51, 82)), "length")
    assert len(d.tokens("t50-1")) + 1 == 32
    logprobs = [lp for e in d.events["t60-3"] for lp in e.logprobs]
    assert [lp.token_id for lp in logprobs] == [63, 64] and len(logprobs[0].top) == 1


async def test_min_tokens_lets_a_stop_token_end_once_reached(kv_memory):
    d = driver(kv_memory)
    d.scheduler.add(task([70], max_tokens=10, eos=[72, 74], min_tokens=3))
    await d.run()
    assert d.batches[0].seqs[0].eos_token_ids == [72, 74]  # masked by the executor below min_tokens
    assert (d.tokens("t70-1")[1:], d.reason("t70-1")) == ([72, 73, 74], "stop")


async def test_copy_on_write_copies_reach_the_batch(kv_memory):
    d = driver(kv_memory)
    d.scheduler.add(task([1, 2, 3, 4, 5, 6], max_tokens=3))
    await d.step()  # 6 prompt tokens computed: block 1 is half full
    d.scheduler.kv.fork("t1-6", "sibling")  # someone shares its blocks now
    shared = d.scheduler.kv.block_table("t1-6")
    batch = await d.step()  # the decode writes position 6, inside the shared block
    (seq,) = batch.seqs
    assert batch.block_copies == [(shared[1], seq.block_table[1])]
    assert seq.block_table[0] == shared[0]
    await d.run()
    assert d.tokens("t1-6") == [7, 8, 9]
    d.scheduler.kv.free("sibling")
    assert d.scheduler.kv_usage().used_blocks == 0


async def test_stats_count_prefill_work_waiting(kv_memory):
    d = driver(kv_memory, max_num_batched_tokens=4)
    d.scheduler.add(task(list(range(10)), max_tokens=2))
    d.scheduler.add(task(list(range(100, 103)), max_tokens=2))
    assert d.scheduler.stats().waiting_prefill_tokens == 13
    await d.step()  # 4 of the first prompt's 10 tokens
    stats = d.scheduler.stats()
    assert (stats.num_running, stats.num_waiting, stats.waiting_prefill_tokens) == (1, 1, 6 + 3)
    await d.run()
    assert d.scheduler.stats() == type(stats)()


def test_a_scored_prompt_skips_prefix_hits_and_is_gathered_once_across_chunks_and_preemption():
    from flowserve_colocated.sequence import Sequence
    from flowserve_core.types import StepResult, TokenLogprob

    scheduler, _ = make(block_size=4, max_num_batched_tokens=8)
    prompt = list(range(1, 21))
    scheduler.kv.allocate("warm", prompt)  # the prompt's blocks are cached
    scheduler.kv.commit("warm", prompt, len(prompt))
    scheduler.kv.free("warm")
    scheduler.add(task(prompt, max_tokens=2, prompt_logprobs=0))
    gathered: list[int] = []
    while True:
        batch = scheduler.schedule()
        [seq] = batch.seqs
        assert seq.start_pos == len(gathered)  # every position computed, none taken from the cache
        # what an executor scores: position p predicts prompt token p + 1
        scored = [TokenLogprob(token_id=t, logprob=-1.0) for t in prompt[seq.start_pos + 1:
                                                                          seq.start_pos + len(seq.token_ids) + 1]]
        events = scheduler.update(batch, StepResult(token_ids={seq.seq_id: 99} if seq.sample else {},
                                                    prompt_logprobs={seq.seq_id: scored}))
        gathered = [e.token_id for e in scheduler.seqs[seq.seq_id].prompt_logprobs] if not events else gathered
        if events:
            assert [e.token_id for e in events[0].prompt_logprobs] == prompt[1:]
            assert events[0].num_cached_tokens == 0
            break
    # a chunk computed again (after a preemption) adds only what is new
    again = Sequence(task(prompt, prompt_logprobs=0), 0)
    again.add_prompt_logprobs(0, [TokenLogprob(token_id=t, logprob=-1.0) for t in prompt[1:9]])
    again.add_prompt_logprobs(0, [TokenLogprob(token_id=t, logprob=-2.0) for t in prompt[1:13]])
    assert [e.token_id for e in again.prompt_logprobs] == prompt[1:13]
    assert [e.logprob for e in again.prompt_logprobs] == [-1.0] * 8 + [-2.0] * 4


async def test_an_executor_that_scores_no_prompt_fails_the_request_naming_itself():
    scheduler, executor = make()
    scheduler.add(task([5, 6, 7, 8, 9], max_tokens=3, prompt_logprobs=1))
    batch = scheduler.schedule()
    [event] = scheduler.update(batch, await executor.execute(batch))  # the toy computes no prompt logprobs
    assert event.finish_reason == "error" and not event.token_ids
    assert "does not compute prompt_logprobs" in event.error and "scored 0 of the prompt's 4 tokens" in event.error
    assert not scheduler.has_work()


# ---------------------------------------------------------------------- multi-step decoding


async def test_multi_step_decoding_gives_the_same_tokens_in_fewer_steps(kv_memory):
    d = driver(kv_memory, decode_steps=4)
    d.scheduler.add(task([100, 101, 102], max_tokens=10, logprobs=1))
    await d.run()
    assert d.tokens("t100-3") == list(range(103, 113)) and d.reason("t100-3") == "length"
    # The first token comes alone (its own step); then 4, 4, and the last one (max_tokens).
    assert [len(e.token_ids) for e in d.events["t100-3"]] == [1, 4, 4, 1]
    assert [s.decode_steps for b in d.batches for s in b.seqs] == [1, 4, 4, 1]
    assert [lp.token_id for e in d.events["t100-3"] for lp in e.logprobs] == list(range(103, 113))
    assert d.scheduler.kv_usage().used_blocks == 0


async def test_multi_step_tokens_after_the_one_that_ends_a_sequence_are_dropped(kv_memory):
    d = driver(kv_memory, decode_steps=4)
    d.scheduler.add(task([10], max_tokens=20, eos=[14]))
    await d.step()  # the prompt, and token 11
    batch = d.scheduler.schedule()
    assert batch.seqs[0].decode_steps == 4
    # An executor need not stop at a stop token: what it sampled after it is not the output.
    events = d.scheduler.update(batch, StepResult(token_ids={"t10-1": 12}, more_token_ids={"t10-1": [13, 14, 15]}))
    assert [(e.token_ids, e.finish_reason) for e in events] == [([12, 13, 14], "stop")]
    assert not d.scheduler.has_work() and d.scheduler.kv_usage().used_blocks == 0


async def test_multi_step_accepts_fewer_tokens_than_asked(kv_memory):
    d = driver(kv_memory, decode_steps=4)
    d.scheduler.add(task([10], max_tokens=20))
    await d.step()
    batch = d.scheduler.schedule()
    d.memory.run(batch)
    events = d.scheduler.update(batch, StepResult(token_ids={"t10-1": 12}, more_token_ids={"t10-1": [13]}))
    assert [(e.token_ids, e.finish_reason) for e in events] == [([12, 13], None)]
    following = d.scheduler.schedule()  # goes on from token 13: position 3
    assert (following.seqs[0].start_pos, following.seqs[0].token_ids) == (3, [13])


async def test_multi_step_only_while_no_waiting_sequence_could_start(kv_memory):
    d = driver(kv_memory, decode_steps=4, max_num_seqs=2)
    d.scheduler.add(task([100], max_tokens=30))
    await d.step()
    assert [s.decode_steps for s in (await d.step()).seqs] == [4]
    d.scheduler.add(task([200], max_tokens=30))
    batch = await d.step()  # the newcomer's prompt: one token each
    assert [(s.seq_id, s.decode_steps) for s in batch.seqs] == [("t100-1", 1), ("t200-1", 1)]
    batch = await d.step()  # both decoding, nobody waits
    assert [s.decode_steps for s in batch.seqs] == [4, 4]
    d.scheduler.add(task([300], max_tokens=30))  # cannot start: max_num_seqs are running
    assert [s.decode_steps for s in (await d.step()).seqs] == [4, 4]
    await d.run()
    assert d.tokens("t300-1") == list(range(301, 331)) and d.tokens("t100-1") == list(range(101, 131))


@pytest.mark.parametrize("num_blocks", [4, 5, 6, 7, 8, 9])
async def test_multi_step_under_a_tiny_cache_preempts_no_more_than_one_token_a_step(kv_memory, num_blocks):
    # blocks of 4 tokens; each task needs 3 of them at the end (prompt 4 + 8 outputs)
    preemptions = {}
    for steps in (1, 4):
        d = driver(kv_memory, decode_steps=steps, num_blocks=num_blocks)
        for first in (100, 200, 300):
            d.scheduler.add(task([first, first + 1, first + 2, first + 3], max_tokens=8))
        await d.run()
        preemptions[steps] = d.scheduler.num_preemptions
        for first in (100, 200, 300):
            assert d.tokens(f"t{first}-4") == list(range(first + 4, first + 12))
    assert preemptions[4] <= preemptions[1]


async def test_multi_step_falls_back_to_one_token_when_blocks_are_short(kv_memory):
    d = driver(kv_memory, decode_steps=4, num_blocks=4)  # 16 tokens
    d.scheduler.add(task([100, 101, 102, 103, 104], max_tokens=5))
    d.scheduler.add(task([200, 201, 202, 203, 204], max_tokens=5))
    await d.step()  # both prompts: two blocks each, the cache is full
    batch = await d.step()  # four more tokens would need a third block each
    assert [s.decode_steps for s in batch.seqs] == [1, 1]
    assert d.scheduler.num_preemptions == 0
    await d.run()
    assert d.tokens("t100-5") == [105, 106, 107, 108, 109] and d.tokens("t200-5") == [205, 206, 207, 208, 209]


async def test_multi_step_never_for_a_structured_output(kv_memory):
    d = driver(kv_memory, decode_steps=4)
    d.scheduler.add(task([10], max_tokens=6, structured_output=StructuredOutput(regex="[0-9]+")))
    await d.run()
    assert all(s.decode_steps == 1 for b in d.batches for s in b.seqs)
