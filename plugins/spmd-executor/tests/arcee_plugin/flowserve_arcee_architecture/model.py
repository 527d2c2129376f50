"""Arcee built from the spmd executor's public layers: its Llama decoder layers with an MLP of
this plugin's own (column-parallel ``up_proj``, squared ReLU, row-parallel ``down_proj``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flowserve_spmd_executor.distributed import TensorParallelGroup
from flowserve_spmd_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from flowserve_spmd_executor.model_config import ModelConfig
from flowserve_spmd_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class SquaredReluMLP(nn.Module):
    """``down(relu(up(x)) ** 2)``, tensor parallel like the executor's gated MLP."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, group: TensorParallelGroup):
        super().__init__()
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, bias, group)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(x)).square())


class ArceeForCausalLM(LlamaForCausalLM):
    """Arcee: Llama layers around a squared-ReLU MLP; only q/k/v are fused from the checkpoint."""

    packed_modules: dict[str, tuple[str, Any]] = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v")}

    def build_layers(self, config: ModelConfig, group: TensorParallelGroup) -> list[nn.Module]:
        return [LlamaDecoderLayer(config, i, group,
                                  mlp=SquaredReluMLP(config.hidden_size, config.intermediate_size, config.mlp_bias,
                                                     group))
                for i in range(config.num_layers)]
