"""A simulated KV memory for the scheduler's tests: it plays the part of paged attention.

The toy ``counter`` executor ignores the KV cache, so on its own it cannot tell a wrong block
table from a right one. ``KVMemory`` does what a real executor's attention would: it applies
the batch's block copies, reads every earlier position of each scheduled sequence through its
block table (each must hold that sequence's token there) and writes the new positions. A
prefix hit with the wrong blocks, a recompute that starts at the wrong place or a block written
while shared fails at once.
"""

from __future__ import annotations

import pytest

from flowserve_core.types import StepBatch, StepResult


class KVMemory:
    """Token ids stored per (block, slot), checked and written the way attention would."""

    def __init__(self, kv_cache):
        self.kv = kv_cache
        self.size = kv_cache.block_size
        self.slots: dict[int, dict[int, int]] = {}
        self.steps = 0

    def run(self, batch: StepBatch) -> None:
        self.steps += 1
        for source, destination in batch.block_copies:
            self.slots[destination] = dict(self.slots.get(source, {}))
        written: dict[int, str] = {}
        for seq in batch.seqs:
            history = list(seq.prompt_token_ids) + list(seq.output_token_ids)
            start, end = seq.start_pos, seq.start_pos + len(seq.token_ids)
            assert seq.token_ids == history[start:end], f"{seq.seq_id}: tokens are not its own"
            assert seq.sample == (end == len(history)), f"{seq.seq_id}: sample flag"
            assert len(seq.block_table) * self.size >= end, f"{seq.seq_id}: too few blocks"
            for position in range(start):
                block = seq.block_table[position // self.size]
                held = self.slots.get(block, {}).get(position % self.size)
                assert held == history[position], \
                    f"{seq.seq_id} position {position}: block {block} holds {held}, not {history[position]}"
            for position in range(start, end):
                block = seq.block_table[position // self.size]
                assert written.setdefault(block, seq.seq_id) == seq.seq_id, \
                    f"block {block} written by {written[block]} and {seq.seq_id} in one step"
                assert self.kv.ref_count(block) == 1, f"{seq.seq_id} writes shared block {block}"
                self.slots.setdefault(block, {})[position % self.size] = history[position]

    def decoded_more(self, batch: StepBatch, result: StepResult) -> None:
        """Multi-step decoding: the KV of each extra token but the last was written too."""
        for seq in batch.seqs:
            more = result.more_token_ids.get(seq.seq_id, [])
            assert len(more) < seq.decode_steps, f"{seq.seq_id}: more tokens than asked"
            written = [result.token_ids[seq.seq_id], *more][:-1] if more else []
            end = seq.start_pos + len(seq.token_ids)
            assert len(seq.block_table) * self.size >= end + len(written), f"{seq.seq_id}: too few blocks"
            for position, token in enumerate(written, end):
                block = seq.block_table[position // self.size]
                assert self.kv.ref_count(block) == 1, f"{seq.seq_id} writes shared block {block}"
                self.slots.setdefault(block, {})[position % self.size] = token


@pytest.fixture
def kv_memory():
    """The ``KVMemory`` class (a fixture, so that test modules need not import each other)."""
    return KVMemory
