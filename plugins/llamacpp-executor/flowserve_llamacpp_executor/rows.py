"""One sequence's part of a ``llamacpp`` step: the tokens its llama.cpp sequence lacks, from
where, and which of its positions give logits, prompt scores or pooled hidden states."""

from __future__ import annotations

from typing import Any

from flowserve_llamacpp_executor.slots import Slot
from flowserve_sampler import prompt_targets


class Row:
    """One sequence's part of a step: its slot, the tokens to decode from ``first_pos``, and
    whether its last token's logits are sampled."""

    __slots__ = ("seq_id", "slot", "tokens", "first_pos", "sample", "scheduled", "scored", "pooled")

    def __init__(self, scheduled: Any, slot: Slot, tokens: list[int], first_pos: int):
        self.seq_id = scheduled.seq_id
        self.slot = slot
        self.tokens = tokens
        self.first_pos = first_pos
        pooling = scheduled.pooling
        self.sample = scheduled.sample and pooling is None
        self.scheduled = scheduled
        #: the row indices whose final hidden states are summed (an embedding's chunk)
        chunk = range(len(tokens) - len(scheduled.token_ids), len(tokens))
        self.pooled = range(0) if pooling is None else chunk if pooling.kind == "mean" else \
            chunk[-1:] if scheduled.sample else range(0)
        #: the prompt tokens this chunk's first positions predict (``prompt_logprobs``)
        self.scored = prompt_targets(scheduled)


def tokens_before(scheduled: Any, start: int) -> list[int]:
    """The sequence's first ``start`` tokens (prompt, then output)."""
    prompt = scheduled.prompt_token_ids
    if start <= len(prompt):
        return list(prompt[:start])
    return list(prompt) + list(scheduled.output_token_ids[:start - len(prompt)])
