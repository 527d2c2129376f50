"""A sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router picks ``top_k`` experts per
token, and each expert — a gated MLP — runs on the tokens routed to it only.

Tensor parallelism splits **inside each expert** (each rank holds every expert's slice of the
intermediate dimension, like the dense MLP; one all-reduce sums the partial outputs), not
experts across ranks. Why: every rank then does the same work whatever the routing (expert
parallelism leaves a rank idle when its experts draw few tokens, and a step waits for the
busiest rank), any expert count works with any rank count that divides the expert size, and
the communication is the dense MLP's single all-reduce.

The experts' weights are stacked: ``w13 [experts, 2 * local_intermediate, hidden]`` (gate
rows, then up rows) and ``w2 [experts, hidden, local_intermediate]``. Checkpoints store one
tensor per expert (``experts.{e}.gate_proj.weight`` or Mixtral's ``experts.{e}.w1.weight``);
their shard id is ``(expert, 0)`` for gate, ``(expert, 1)`` for up, ``(expert, None)`` for down.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flowserve_spmd_executor.distributed import TensorParallelGroup
from flowserve_spmd_executor.layers.linear import ParallelLinear
from flowserve_spmd_executor.layers.mlp import ACTIVATIONS


class RoutedExperts(nn.Module):
    """The stacked experts of one layer; ``forward`` runs each expert on its tokens only."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str,
                 group: TensorParallelGroup):
        super().__init__()
        if intermediate_size % group.world_size:
            raise ValueError(f"tensor_parallel={group.world_size} does not divide the experts' "
                             f"MLP size {intermediate_size}")
        self.group = group
        self.local = intermediate_size // group.world_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.local, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.local), requires_grad=False)
        self.act = ACTIVATIONS[act]

    def weight_loader(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        """Copy this rank's slice of one expert's gate, up (rows) or down (columns) weight."""
        expert, part = shard_id
        start = self.group.rank * self.local
        if param is self.w13:
            param.data[expert].narrow(0, part * self.local, self.local).copy_(source.read(0, start, self.local))
        else:
            param.data[expert].copy_(source.read(1, start, self.local))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """``x [T, hidden]``, each token's ``top_k`` expert ids and weights ``[T, top_k]`` → the
        weighted sum of its experts' outputs (this rank's partial sum under tensor parallelism)."""
        top_k = experts.shape[1]
        flat = experts.view(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.w13.shape[0]).tolist()
        token_of = order // top_k
        weight_of = weights.reshape(-1).index_select(0, order)
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if not count:
                continue
            rows = token_of[start:start + count]
            gate, up = torch.matmul(x.index_select(0, rows), self.w13[expert].t()).chunk(2, dim=-1)
            y = torch.matmul(self.act(gate) * up, self.w2[expert].t())
            out.index_add_(0, rows, y * weight_of[start:start + count, None])
            start += count
        return out


class SparseMoE(nn.Module):
    """Router + routed experts: softmax over the router's logits (float32), the ``top_k``
    largest, renormalised to sum to one when ``normalize`` (Mixtral always; Qwen3-MoE when its
    config's ``norm_topk_prob``), then the experts' weighted sum."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, act: str,
                 normalize: bool, group: TensorParallelGroup):
        super().__init__()
        self.top_k, self.normalize, self.group = top_k, normalize, group
        self.gate = ParallelLinear(hidden_size, num_experts, False, group, shard_dim=None)  # replicated
        self.experts = RoutedExperts(num_experts, hidden_size, intermediate_size, act, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.experts(x, weights.to(x.dtype), experts)
        return self.group.all_reduce(out) if self.group.world_size > 1 else out
