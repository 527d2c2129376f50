"""The Llama family (Llama, Mistral, Qwen2, SmolLM2) over paged KV blocks, tensor parallel.

Differences between the members are configuration (``ModelConfig``): q/k/v/o and MLP biases,
tied embeddings, rotary scaling, sliding windows. Parameter names follow the HF checkpoints
except for the fused ``qkv_proj`` and ``gate_up_proj`` (see ``CausalLM.packed_modules``).
"""

from __future__ import annotations

import torch
from torch import nn

from flowserve_spmd_executor.distributed import TensorParallelGroup
from flowserve_spmd_executor.layers.attention import AttentionMetadata
from flowserve_spmd_executor.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from flowserve_spmd_executor.layers.mlp import GatedMLP
from flowserve_spmd_executor.layers.norm import RMSNorm
from flowserve_spmd_executor.layers.rotary import RotaryEmbedding
from flowserve_spmd_executor.layers.self_attention import DecoderAttention
from flowserve_spmd_executor.model_config import ModelConfig
from flowserve_spmd_executor.models.base import CausalLM


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; the residual add is fused into the next norm."""

    def __init__(self, config: ModelConfig, layer: int, group: TensorParallelGroup, qk_norm: str = "",
                 mlp: nn.Module | None = None):
        super().__init__()
        self.self_attn = DecoderAttention(config, layer, group, qk_norm=qk_norm)
        self.mlp = mlp if mlp is not None else GatedMLP(config.hidden_size, config.intermediate_size,
                                                        config.mlp_bias, config.hidden_act, group)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm."""

    def __init__(self, config: ModelConfig, group: TensorParallelGroup, layers: list[nn.Module] | None = None,
                 norm_class: type[RMSNorm] = RMSNorm):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, group)
        self.layers = nn.ModuleList(layers if layers is not None else
                                    (LlamaDecoderLayer(config, i, group) for i in range(config.num_layers)))
        self.norm = norm_class(config.hidden_size, config.rms_norm_eps)
        self.embedding_multiplier = config.embedding_multiplier  # Granite's; 1 elsewhere

    def forward(self, token_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(token_ids), None
        if self.embedding_multiplier != 1.0:
            hidden = hidden * self.embedding_multiplier
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin, meta)
        if residual is None:  # layers that add their own residuals (OLMo 2)
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(CausalLM):
    """The whole model: ``forward`` gives final hidden states, ``compute_logits`` the logits
    of the rows asked for (only the tokens that are sampled pay for the LM head). Qwen3 and
    the MoE models reuse it with other decoder layers (``build_layers``)."""

    #: the final norm's kind
    norm_class: type[RMSNorm] = RMSNorm

    def __init__(self, config: ModelConfig, group: TensorParallelGroup, max_positions: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, group, self.build_layers(config, group), self.norm_class)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, group)
        if config.tie_word_embeddings:
            self.tie_weights()
        self.rotary = RotaryEmbedding(config.rope, config.rotary_dim or config.head_dim, max_positions, dtype,
                                      device)

    def build_layers(self, config: ModelConfig, group: TensorParallelGroup) -> list[nn.Module]:
        """The decoder layers (a subclass swaps in its own)."""
        return [LlamaDecoderLayer(config, i, group) for i in range(config.num_layers)]

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        cos, sin = self.rotary.lookup(positions)
        return self.model(token_ids, cos, sin, meta)
