"""IBM Granite (3.x): the Llama layout scaled by four multipliers from its config — embeddings
× ``embedding_multiplier`` (in ``LlamaModel``), the attention's softmax scale is
``attention_multiplier`` (``ModelConfig.attention_scale``), each block's output ×
``residual_multiplier`` before its residual add (here), logits ÷ ``logits_scaling``
(``CausalLM.compute_logits``)."""

from __future__ import annotations

import torch
from torch import nn

from flowserve_spmd_executor.distributed import TensorParallelGroup
from flowserve_spmd_executor.layers.attention import AttentionMetadata
from flowserve_spmd_executor.model_config import ModelConfig
from flowserve_spmd_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class GraniteDecoderLayer(LlamaDecoderLayer):
    """A Llama layer whose attention and MLP outputs are scaled before their residual adds."""

    def __init__(self, config: ModelConfig, layer: int, group: TensorParallelGroup):
        super().__init__(config, layer, group)
        self.residual_multiplier = config.residual_multiplier

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin, meta) * self.residual_multiplier
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden) * self.residual_multiplier, residual


class GraniteForCausalLM(LlamaForCausalLM):
    """Granite: Llama with its multipliers."""

    def build_layers(self, config: ModelConfig, group: TensorParallelGroup) -> list[nn.Module]:
        return [GraniteDecoderLayer(config, i, group) for i in range(config.num_layers)]
