"""OLMo 2: norms after the blocks, not before (``h += post_attn_norm(attn(h))``, then
``h += post_ff_norm(mlp(h))``), and q/k RMSNorm over the whole projections (every head at
once, so under tensor parallelism its sum of squares is all-reduced: ``ShardedRMSNorm``)."""

from __future__ import annotations

import torch
from torch import nn

from flowserve_spmd_executor.distributed import TensorParallelGroup
from flowserve_spmd_executor.layers.attention import AttentionMetadata
from flowserve_spmd_executor.layers.mlp import GatedMLP
from flowserve_spmd_executor.layers.norm import FloatWeightRMSNorm, RMSNorm
from flowserve_spmd_executor.layers.self_attention import DecoderAttention
from flowserve_spmd_executor.model_config import ModelConfig
from flowserve_spmd_executor.models.llama import LlamaForCausalLM


class Olmo2DecoderLayer(nn.Module):
    """Post-norm attention and MLP blocks with their residual adds."""

    def __init__(self, config: ModelConfig, layer: int, group: TensorParallelGroup):
        super().__init__()
        self.self_attn = DecoderAttention(config, layer, group, qk_norm="projection")
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.mlp_bias, config.hidden_act, group)
        self.post_attention_layernorm = FloatWeightRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = FloatWeightRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, None]:
        if residual is not None:  # never: this layer adds its own residuals
            hidden = hidden + residual
        hidden = hidden + self.post_attention_layernorm(self.self_attn(hidden, cos, sin, meta))
        return hidden + self.post_feedforward_layernorm(self.mlp(hidden)), None


class Olmo2ForCausalLM(LlamaForCausalLM):
    """OLMo 2: Llama's embedding and head around post-norm layers; its norms apply their weight
    before casting back (``FloatWeightRMSNorm``)."""

    norm_class: type[RMSNorm] = FloatWeightRMSNorm

    def build_layers(self, config: ModelConfig, group: TensorParallelGroup) -> list[nn.Module]:
        return [Olmo2DecoderLayer(config, i, group) for i in range(config.num_layers)]
