"""The step plan: everything every rank needs to run one forward pass, and nothing more.

Rank 0 turns a ``StepBatch`` into a ``StepPlan`` (flat token ids, positions, KV slots, block
tables, which rows need logits, block copies) and sends it to the other ranks as one small
msgpack frame; sampling parameters and token histories stay on rank 0, which samples.

Sequences are reordered: single-token sequences (decode) first, then multi-token prefill
chunks, because attention batches each group separately (``layers/attention.py``).
"""

from __future__ import annotations

import msgspec

from flowserve_core.types import ScheduledSequence, StepBatch
from flowserve_sampler import prompt_targets


class StepPlan(msgspec.Struct, array_like=True, kw_only=True):
    """One forward pass, as flat lists (tokens of sequence i are contiguous)."""

    token_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    query_lens: list[int] = []
    context_lens: list[int] = []
    block_tables: list[list[int]] = []
    num_decode: int = 0
    #: flat token index of each row whose logits are computed (the sampled sequences' last tokens)
    logits_rows: list[int] = []
    #: flat token index of each prompt position scored (``prompt_logprobs``), after ``logits_rows``
    prompt_rows: list[int] = []
    block_copies: list[tuple[int, int]] = []
    #: flat token rows ``[start, end)`` whose final hidden states are summed, one range per
    #: pooled sequence (an embedding): its last token, or (mean pooling) its whole chunk
    pool_ranges: list[tuple[int, int]] = []


def build_step_plan(batch: StepBatch, *, block_size: int, max_model_len: int,
                    num_blocks: int) -> tuple[StepPlan, list[ScheduledSequence],
                                              list[tuple[ScheduledSequence, list[int]]], list[ScheduledSequence]]:
    """The plan of ``batch``, the sequences to sample (in the order of ``plan.logits_rows``),
    the prompt tokens each scored sequence's rows predict (in the order of ``plan.prompt_rows``)
    and the pooled sequences (embeddings, in the order of ``plan.pool_ranges``).

    Raises ``ValueError`` naming the sequence for an empty chunk, a position past
    ``max_model_len`` or a block table too short for the tokens.
    """
    ordered = [s for s in batch.seqs if len(s.token_ids) == 1] + [s for s in batch.seqs if len(s.token_ids) != 1]
    plan = StepPlan(num_decode=len(ordered) - sum(len(s.token_ids) != 1 for s in batch.seqs),
                    block_copies=[(int(a), int(b)) for a, b in batch.block_copies])
    sampled: list[ScheduledSequence] = []
    scored: list[tuple[ScheduledSequence, list[int]]] = []
    pooled: list[ScheduledSequence] = []
    token_ids, positions, slots = plan.token_ids, plan.positions, plan.slot_mapping
    for seq in ordered:
        count, start, table = len(seq.token_ids), seq.start_pos, seq.block_table
        end = start + count
        if count == 0:
            raise ValueError(f"sequence {seq.seq_id} was scheduled with no tokens")
        if start < 0 or end > max_model_len:
            raise ValueError(f"sequence {seq.seq_id}: positions {start}..{end - 1} exceed the model's "
                             f"context of {max_model_len} tokens")
        if len(table) * block_size < end:
            raise ValueError(f"sequence {seq.seq_id}: {len(table)} KV blocks of {block_size} tokens cannot "
                             f"hold {end} tokens")
        if table and (min(table) < 0 or max(table) >= num_blocks):
            raise ValueError(f"sequence {seq.seq_id}: block table has ids outside [0, {num_blocks})")
        if targets := prompt_targets(seq):
            plan.prompt_rows.extend(range(len(token_ids), len(token_ids) + len(targets)))
            scored.append((seq, targets))
        token_ids.extend(seq.token_ids)
        if count == 1:
            positions.append(start)
            slots.append(table[start // block_size] * block_size + start % block_size)
        else:
            positions.extend(range(start, end))
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        plan.query_lens.append(count)
        plan.context_lens.append(end)
        plan.block_tables.append(table[:-(-end // block_size)])
        if seq.pooling is not None:
            # mean pooling sums every chunk; last-token pooling reads only the prompt's end
            if seq.pooling.kind == "mean" or seq.sample:
                plan.pool_ranges.append((len(token_ids) - (count if seq.pooling.kind == "mean" else 1),
                                         len(token_ids)))
                pooled.append(seq)
        elif seq.sample:
            plan.logits_rows.append(len(token_ids) - 1)
            sampled.append(seq)
    return plan, sampled, scored, pooled
