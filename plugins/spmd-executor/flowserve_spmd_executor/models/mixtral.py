"""Mixtral: the Mistral layout whose MLP is a sparse mixture of experts (``layers/moe.py``):
softmax router, top-k (2) experts per token, their weights renormalised to sum to one. The
checkpoint's ``block_sparse_moe`` holds the router (``gate``) and per-expert ``w1`` (gate),
``w3`` (up) and ``w2`` (down)."""

from __future__ import annotations

from typing import Any

from torch import nn

from flowserve_spmd_executor.distributed import TensorParallelGroup
from flowserve_spmd_executor.layers.moe import SparseMoE
from flowserve_spmd_executor.model_config import ModelConfig
from flowserve_spmd_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM


def sparse_moe(config: ModelConfig, group: TensorParallelGroup) -> SparseMoE:
    """The MoE block of one layer, as ``config`` sizes it."""
    return SparseMoE(config.num_experts, config.num_experts_per_tok, config.hidden_size,
                     config.moe_intermediate_size, config.hidden_act, config.norm_topk_prob, group)


class MixtralForCausalLM(LlamaForCausalLM):
    """Mixtral: Llama layers with a ``SparseMoE`` as their MLP (named ``mlp`` here)."""

    expert_modules: dict[str, tuple[str, Any]] = {"w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", None)}

    def build_layers(self, config: ModelConfig, group: TensorParallelGroup) -> list[nn.Module]:
        return [LlamaDecoderLayer(config, i, group, mlp=sparse_moe(config, group)) for i in range(config.num_layers)]

    def checkpoint_target(self, name: str) -> tuple[str | None, Any]:
        return super().checkpoint_target(name.replace(".block_sparse_moe.", ".mlp."))
