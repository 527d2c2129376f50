"""Qwen3-MoE: Qwen3's attention (per-head q/k norm) with a sparse mixture of experts as the MLP
of every layer except ``mlp_only_layers`` (and as ``decoder_sparse_step`` says): softmax
router, top-k experts, renormalised only when ``norm_topk_prob``."""

from __future__ import annotations

from typing import Any

from torch import nn

from flowserve_spmd_executor.distributed import TensorParallelGroup
from flowserve_spmd_executor.model_config import ModelConfig
from flowserve_spmd_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from flowserve_spmd_executor.models.mixtral import sparse_moe


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    """Qwen3-MoE: Qwen3 layers whose MLP is routed experts where ``moe_layers`` says."""

    expert_modules: dict[str, tuple[str, Any]] = {
        "gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", None)}

    def build_layers(self, config: ModelConfig, group: TensorParallelGroup) -> list[nn.Module]:
        return [LlamaDecoderLayer(config, i, group, qk_norm="head",
                                  mlp=sparse_moe(config, group) if config.moe_layers[i] else None)
                for i in range(config.num_layers)]
