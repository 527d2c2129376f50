"""The model runner of one rank: a ``StepPlan`` → tensors → forward → logits.

Every rank runs the same program on its shard (SPMD): the collectives inside the layers
line the ranks up. Per-step tensors (ids, positions, slots, attention metadata, cos/sin)
are built once and shared by all layers.
"""

from __future__ import annotations

import torch

from flowserve_spmd_executor.distributed import TensorParallelGroup
from flowserve_spmd_executor.kv_cache import KVCache
from flowserve_spmd_executor.layers.attention import GatherWorkspace, build_attention_metadata
from flowserve_spmd_executor.models.base import CausalLM
from flowserve_spmd_executor.plan import StepPlan


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
    def run(self, plan: StepPlan) -> torch.Tensor | None:
        """Copy the plan's blocks, run the forward pass, and return the logits ``[rows, vocab]``
        of ``plan.logits_rows`` (None when no row is sampled). Same call on every rank."""
        self.kv_cache.copy_blocks(plan.block_copies)
        if not plan.token_ids:
            return None
        device = self.device
        token_ids = torch.tensor(plan.token_ids, dtype=torch.long, device=device)
        positions = torch.tensor(plan.positions, dtype=torch.long, device=device)
        meta = build_attention_metadata(
            slot_mapping=plan.slot_mapping, query_lens=plan.query_lens, context_lens=plan.context_lens,
            block_tables=plan.block_tables, num_decode=plan.num_decode, block_size=self.block_size,
            group_size=self.group_size, windows=self.windows, device=device,
            workspace=self.workspace, block_shape=self.block_shape)
        hidden = self.model(token_ids, positions, meta)
        if not plan.logits_rows:
            return None
        if len(plan.logits_rows) != hidden.shape[0]:
            hidden = hidden.index_select(0, torch.tensor(plan.logits_rows, dtype=torch.long, device=device))
        return self.model.compute_logits(hidden)
