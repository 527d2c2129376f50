"""Gemma 2: GeGLU MLP, Gemma RMSNorm (``1 + weight``) before and after both the attention and
the MLP, embeddings × ``sqrt(hidden_size)``, softmax scale ``query_pre_attn_scalar ** -0.5``,
attention and final logit soft-capping, and sliding-window layers interleaved with global
ones (``layer_types``). Gemma 3 (``gemma3.py``) adds q/k norm and a local rope base."""

from __future__ import annotations

import torch
from torch import nn

from flowserve_spmd_executor.distributed import TensorParallelGroup
from flowserve_spmd_executor.layers.attention import AttentionMetadata
from flowserve_spmd_executor.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from flowserve_spmd_executor.layers.mlp import GatedMLP
from flowserve_spmd_executor.layers.norm import GemmaRMSNorm
from flowserve_spmd_executor.layers.rotary import RotaryEmbedding
from flowserve_spmd_executor.layers.self_attention import DecoderAttention
from flowserve_spmd_executor.model_config import ModelConfig
from flowserve_spmd_executor.models.base import CausalLM


class Gemma2DecoderLayer(nn.Module):
    """``h += post_attn_norm(attn(input_norm(h)))``, then ``h += post_ff_norm(mlp(pre_ff_norm(h)))``."""

    def __init__(self, config: ModelConfig, layer: int, group: TensorParallelGroup, qk_norm: str = ""):
        super().__init__()
        size, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = DecoderAttention(config, layer, group, qk_norm=qk_norm, norm_class=GemmaRMSNorm)
        self.mlp = GatedMLP(size, config.intermediate_size, False, config.hidden_act, group)
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(hidden), cos, sin, meta)
        hidden = hidden + self.post_attention_layernorm(attn)
        return hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))


class Gemma2Model(nn.Module):
    """Scaled embedding, decoder layers, final norm."""

    def __init__(self, config: ModelConfig, group: TensorParallelGroup, qk_norm: str, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, group)
        self.layers = nn.ModuleList(Gemma2DecoderLayer(config, i, group, qk_norm) for i in range(config.num_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        #: per layer, which rotary table it takes: 1 for Gemma 3's sliding layers (local base)
        self.local_rope = [int(bool(config.local_rope and window)) for window in config.sliding_windows]
        # HF rounds the factor to the model's dtype before multiplying (it matters in bfloat16).
        self.embed_scale = float(torch.tensor(config.hidden_size ** 0.5, dtype=dtype, device="cpu"))

    def forward(self, token_ids: torch.Tensor, ropes: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(token_ids) * self.embed_scale
        for layer, local in zip(self.layers, self.local_rope):
            cos, sin = ropes[local]
            hidden = layer(hidden, cos, sin, meta)
        return self.norm(hidden)


class Gemma2ForCausalLM(CausalLM):
    """Gemma 2 (and, with ``qk_norm``, Gemma 3's text model)."""

    qk_norm = ""

    def __init__(self, config: ModelConfig, group: TensorParallelGroup, max_positions: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.config = config
        self.model = Gemma2Model(config, group, self.qk_norm, dtype)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, group)
        if config.tie_word_embeddings:
            self.tie_weights()
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, max_positions, dtype, device)
        self.local_rotary = RotaryEmbedding(config.local_rope, config.head_dim, max_positions, dtype, device) \
            if config.local_rope else None

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        ropes = [self.rotary.lookup(positions)]
        if self.local_rotary is not None:
            ropes.append(self.local_rotary.lookup(positions))
        return self.model(token_ids, ropes, meta)
