"""Qwen3 (dense): the Llama layout with an RMSNorm on each query and key head before the
rotary embedding (``q_norm``/``k_norm``), and no q/k/v biases unless ``attention_bias``."""

from __future__ import annotations

from torch import nn

from flowserve_spmd_executor.distributed import TensorParallelGroup
from flowserve_spmd_executor.model_config import ModelConfig
from flowserve_spmd_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: Llama's decoder layers with per-head q/k RMSNorm."""

    def build_layers(self, config: ModelConfig, group: TensorParallelGroup) -> list[nn.Module]:
        return [LlamaDecoderLayer(config, i, group, qk_norm="head") for i in range(config.num_layers)]
