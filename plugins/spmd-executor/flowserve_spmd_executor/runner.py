"""The model runner of one rank: a ``StepPlan`` → tensors → forward → logits (and the pooled
final hidden states of embeddings).

Every rank runs the same program on its shard (SPMD): the collectives inside the layers
line the ranks up. Per-step tensors (ids, positions, slots, attention metadata, cos/sin)
are built once and shared by all layers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from flowserve_spmd_executor.distributed import TensorParallelGroup
from flowserve_spmd_executor.kv_cache import KVCache
from flowserve_spmd_executor.layers.attention import GatherWorkspace, build_attention_metadata
from flowserve_spmd_executor.models.base import CausalLM
from flowserve_spmd_executor.plan import StepPlan


class StepOutput(NamedTuple):
    """One forward pass's results on rank 0: the logits ``[rows, vocab]`` of ``plan.logits_rows``
    then ``plan.prompt_rows``, and the float32 sums ``[ranges, hidden]`` of the final hidden
    states over each of ``plan.pool_ranges`` (None where the plan asks for none)."""

    logits: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


class ModelRunner:
    """Runs step plans on one rank's model and KV cache."""

    def __init__(self, model: CausalLM, kv_cache: KVCache, group: TensorParallelGroup,
                 device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.group = group
        self.device = device
        self.block_size = kv_cache.block_size
        layers = model.attention_layers()
        for index, attention in enumerate(layers):
            attention.k_cache, attention.v_cache = kv_cache.layer(index)
        self.group_size = layers[0].group
        self.windows = {attention.sliding_window for attention in layers}
        self.workspace = GatherWorkspace(kv_cache.tensor.dtype, device)
        self.block_shape = tuple(kv_cache.tensor.shape[3:])

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> StepOutput:
        """Copy the plan's blocks, run the forward pass, and return the logits and pooled hidden
        states the plan asks for (``StepOutput``). Same call on every rank (the hidden state after
        the final norm is the same on each)."""
        self.kv_cache.copy_blocks(plan.block_copies)
        if not plan.token_ids:
            return StepOutput()
        device = self.device
        token_ids = torch.tensor(plan.token_ids, dtype=torch.long, device=device)
        positions = torch.tensor(plan.positions, dtype=torch.long, device=device)
        meta = build_attention_metadata(
            slot_mapping=plan.slot_mapping, query_lens=plan.query_lens, context_lens=plan.context_lens,
            block_tables=plan.block_tables, num_decode=plan.num_decode, block_size=self.block_size,
            group_size=self.group_size, windows=self.windows, device=device,
            workspace=self.workspace, block_shape=self.block_shape)
        hidden = self.model(token_ids, positions, meta)
        pooled = torch.stack([hidden[start:end].float().sum(0) for start, end in plan.pool_ranges]) \
            if plan.pool_ranges else None
        rows = plan.logits_rows + plan.prompt_rows
        if not rows:
            return StepOutput(None, pooled)
        if len(rows) != hidden.shape[0] or rows != list(range(len(rows))):
            hidden = hidden.index_select(0, torch.tensor(rows, dtype=torch.long, device=device))
        return StepOutput(self.model.compute_logits(hidden), pooled)
