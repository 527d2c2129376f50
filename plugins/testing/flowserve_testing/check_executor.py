"""Conformance suite for executors: ``await check_executor(executor)``.

The suite hands out KV blocks itself (each sequence gets fresh blocks from the executor's
``kv_cache_spec``) and compares greedy results that must agree: a prompt computed whole or in
chunks, alone or batched with others, or continued from another sequence's copied blocks.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

from flowserve_core.interfaces import Executor
from flowserve_core.types import SamplingParams, ScheduledSequence, StepBatch, StepResult
from flowserve_testing._suite import ConformanceError, require

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


async def check_executor(executor: Executor, *, vocab_size: int | None = None, decode_steps: int = 4) -> None:
    """Check that a built executor keeps the ``Executor`` Protocol's promises (async).

    :param executor: the built executor (the caller builds and closes it).
    :param vocab_size: when given, every sampled token must be below it.
    Rules: ``kv_cache_spec()`` is sane; ``execute`` returns a token for exactly the sequences
    with ``sample`` set; greedy decoding gives the same tokens whether a prompt is computed
    whole or in chunks, alone or batched; a sequence continuing from blocks copied with
    ``block_copies`` samples what the original samples; logprobs come when asked (the sampled
    token's, and ``params.logprobs`` alternatives, best first); two sequences with the same
    prompt and ``seed`` sample the same token. Raises ``ConformanceError`` naming the rule.
    """
    require(isinstance(executor, Executor), "an executor has every member of the Executor Protocol",
            type(executor).__name__)
    spec = executor.kv_cache_spec()
    require(spec.num_blocks >= 8 and spec.block_size >= 1 and spec.max_model_len >= 32,
            "kv_cache_spec() gives at least 8 blocks and a context of 32 tokens", str(spec))
    run = _Run(executor, spec.block_size, spec.num_blocks, vocab_size)
    prompt_a = [(7 * i) % 50 + 1 for i in range(11)]
    prompt_b = [(3 * i) % 40 + 2 for i in range(5)]
    # A and B whole and batched; C is A again, alone, in two chunks.
    a, b = run.new(prompt_a), run.new(prompt_b)
    first = await run.step([a.whole(), b.whole()])
    c = run.new(prompt_a)
    await run.step([c.chunk(6)])
    await run.step([c.chunk(len(prompt_a) - 6)])
    require(c.output == a.output == [first.token_ids[a.seq_id]], "greedy: a prompt computed in chunks samples what "
            "it samples computed whole", f"{c.output} vs {a.output}")
    for _ in range(decode_steps):
        await run.step([a.next(), b.next()])
        await run.step([c.next()])
    require(c.output == a.output, "greedy: a sequence decodes the same tokens alone and batched",
            f"{c.output} vs {a.output}")
    # D continues from copies of A's blocks, in the same step as A.
    d = run.fork(a)
    await run.step([a.next(), d.next()], block_copies=list(zip(a.blocks, d.blocks)), finished=[b.seq_id])
    require(d.output[-1] == a.output[-1], "a sequence continuing from blocks copied by block_copies "
            "samples what the original samples", f"{d.output[-1]} vs {a.output[-1]}")
    await _check_logprobs_and_seeds(run, prompt_b)


async def _check_logprobs_and_seeds(run: _Run, prompt: list[int]) -> None:
    asks = run.new(prompt, SamplingParams(temperature=0.0, logprobs=3))
    twins = [run.new(prompt, SamplingParams(temperature=1.0, seed=1234)) for _ in range(2)]
    result = await run.step([asks.whole(), *(t.whole() for t in twins)])
    logprob = result.logprobs.get(asks.seq_id)
    if logprob is None:
        raise ConformanceError("a sequence that asks for logprobs gets them in StepResult.logprobs")
    require(logprob.token_id == result.token_ids[asks.seq_id] and logprob.logprob <= 1e-6,
            "logprobs are the sampled token's, at most 0", str(logprob))
    values = [alternative.logprob for alternative in logprob.top]
    require(len(values) == 3 and values == sorted(values, reverse=True) and all(v <= 1e-6 for v in values),
            "logprobs list params.logprobs alternatives, most likely first", str(logprob.top))
    require(all(math.isfinite(v) for v in values), "alternative logprobs are finite", str(values))
    require(result.token_ids[twins[0].seq_id] == result.token_ids[twins[1].seq_id],
            "two sequences with the same prompt and seed sample the same token")


class _Seq:
    """One sequence's tokens, blocks and progress, as a scheduler would keep them."""

    def __init__(self, seq_id: str, prompt: list[int], blocks: list[int], params: SamplingParams):
        self.seq_id, self.prompt, self.blocks, self.params = seq_id, prompt, blocks, params
        self.output: list[int] = []
        self.computed = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def chunk(self, n: int) -> ScheduledSequence:
        start = self.computed
        self.computed += n
        return ScheduledSequence(seq_id=self.seq_id, token_ids=self.tokens[start:start + n], start_pos=start,
                                 block_table=list(self.blocks), sample=self.computed == len(self.tokens),
                                 params=self.params, prompt_token_ids=list(self.prompt),
                                 output_token_ids=list(self.output))

    def whole(self) -> ScheduledSequence:
        return self.chunk(len(self.tokens) - self.computed)

    next = whole  # a decode step computes the one token sampled last


class _Run:
    def __init__(self, executor: Executor, block_size: int, num_blocks: int, vocab_size: int | None):
        self.executor, self.block_size, self.vocab_size = executor, block_size, vocab_size
        self.free_blocks = list(range(num_blocks))
        self.seqs: dict[str, _Seq] = {}
        self._ids = itertools.count()

    def new(self, prompt: list[int], params: SamplingParams = GREEDY) -> _Seq:
        needed = -(-(len(prompt) + 16) // self.block_size)
        require(len(self.free_blocks) >= needed, "kv_cache_spec() gives enough blocks for the suite",
                f"{needed} more wanted")
        blocks, self.free_blocks = self.free_blocks[:needed], self.free_blocks[needed:]
        seq = _Seq(f"conformance-{next(self._ids)}", list(prompt), blocks, params)
        self.seqs[seq.seq_id] = seq
        return seq

    def fork(self, parent: _Seq) -> _Seq:
        child = self.new(parent.prompt, parent.params)
        child.output, child.computed = list(parent.output), parent.computed
        return child

    async def step(self, scheduled: list[ScheduledSequence], block_copies: Sequence[tuple[int, int]] = (),
                   finished: Sequence[str] = ()) -> StepResult:
        batch = StepBatch(seqs=scheduled, block_copies=list(block_copies), finished_seq_ids=list(finished))
        result = await self.executor.execute(batch)
        require(isinstance(result, StepResult), "execute() returns a StepResult", type(result).__name__)
        sampling = {s.seq_id for s in scheduled if s.sample}
        require(set(result.token_ids) == sampling, "execute() returns one token for exactly the sequences "
                "with sample set", f"{sorted(result.token_ids)} vs {sorted(sampling)}")
        for seq_id, token in result.token_ids.items():
            require(isinstance(token, int) and token >= 0 and (self.vocab_size is None or token < self.vocab_size),
                    "sampled tokens are token ids", f"{token!r}")
            self.seqs[seq_id].output.append(token)
        return result
