"""Vocabulary-parallel embedding and LM head: each rank holds ``ceil(vocab / N)`` rows.

The embedding looks up the ids in this rank's range (others give zeros) and all-reduces;
the LM head computes this rank's slice of the logits and all-gathers them. Rows past the
real vocabulary (padding) are zero and cut off after the gather.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flowserve_spmd_executor.distributed import TensorParallelGroup
from flowserve_spmd_executor.layers.linear import PACKED_MIN_TOKENS, pack_weight, packed_linear


class VocabParallelEmbedding(nn.Module):
    """Token embeddings sharded by vocabulary row."""

    def __init__(self, vocab_size: int, hidden_size: int, group: TensorParallelGroup):
        super().__init__()
        self.group = group
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // group.world_size)
        self.start = group.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        """Copy this rank's rows; padding rows become zero."""
        rows = max(0, min(self.rows, self.vocab_size - self.start))
        param.data.zero_()
        if rows:
            param.data.narrow(0, 0, rows).copy_(source.read(0, self.start, rows))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.group.world_size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.start
        inside = (local >= 0) & (local < self.rows)
        out = F.embedding(local.masked_fill(~inside, 0), self.weight)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return self.group.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states → logits over the whole vocabulary (gathered from every rank)."""

    packed: torch.Tensor | None = None

    def pack(self) -> None:
        """Keep a second copy of the weight pre-packed for oneDNN (see ``linear.packed_linear``)."""
        self.packed = pack_weight(self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and hidden.shape[0] >= PACKED_MIN_TOKENS:
            logits = packed_linear(hidden, self.packed, None)
        else:
            logits = F.linear(hidden, self.weight)
        if self.group.world_size > 1:
            logits = self.group.all_gather(logits, dim=-1)
        return logits[..., :self.vocab_size]
