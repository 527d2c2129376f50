"""The Llama family (Llama, Mistral, Qwen2, SmolLM2) over paged KV blocks, tensor parallel.

Differences between the members are configuration (``ModelConfig``): q/k/v/o and MLP biases,
tied embeddings, rotary scaling, sliding windows. Parameter names follow the HF checkpoints
except for the fused ``qkv_proj`` and ``gate_up_proj`` (see ``packed_modules``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowserve_spmd_executor.distributed import TensorParallelGroup
from flowserve_spmd_executor.layers.attention import AttentionMetadata, PagedAttention
from flowserve_spmd_executor.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from flowserve_spmd_executor.layers.linear import (
    MergedColumnParallelLinear,
    ParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from flowserve_spmd_executor.layers.norm import RMSNorm
from flowserve_spmd_executor.layers.rotary import RotaryEmbedding, apply_rotary
from flowserve_spmd_executor.model_config import ModelConfig


class LlamaAttention(nn.Module):
    """Fused QKV projection, rotary embedding, paged attention, output projection."""

    def __init__(self, config: ModelConfig, layer: int, group: TensorParallelGroup):
        super().__init__()
        hd = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, hd, config.num_heads, config.num_kv_heads,
                                          config.qkv_bias, group)
        shard = self.qkv_proj.shard
        self.o_proj = RowParallelLinear(config.num_heads * hd, config.hidden_size, config.o_bias, group)
        self.heads, self.kv_heads, self.head_dim = shard.heads, shard.kv_heads, hd
        self.attn = PagedAttention(shard.heads, shard.kv_heads, hd, config.sliding_windows[layer])

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        tokens, heads, kv_heads, hd = hidden.shape[0], self.heads, self.kv_heads, self.head_dim
        qkv = self.qkv_proj(hidden)
        # Queries and keys are rotated together: one set of ops for both.
        qk = apply_rotary(qkv[:, :(heads + kv_heads) * hd].view(tokens, heads + kv_heads, hd), cos, sin)
        v = qkv[:, (heads + kv_heads) * hd:].view(tokens, kv_heads, hd)
        out = self.attn(qk[:, :heads], qk[:, heads:], v, meta)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused into one matmul."""

    def __init__(self, config: ModelConfig, group: TensorParallelGroup):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], config.mlp_bias, group)
        self.down_proj = RowParallelLinear(size, config.hidden_size, config.mlp_bias, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; the residual add is fused into the next norm."""

    def __init__(self, config: ModelConfig, layer: int, group: TensorParallelGroup):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer, group)
        self.mlp = LlamaMLP(config, group)
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

    def __init__(self, config: ModelConfig, group: TensorParallelGroup):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, group)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, group) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, token_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(token_ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """The whole model: ``forward`` gives final hidden states, ``compute_logits`` the logits
    of the rows asked for (only the tokens that are sampled pay for the LM head)."""

    #: checkpoint name fragment → (fused parameter fragment, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, group: TensorParallelGroup, max_positions: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, group)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, group)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, max_positions, dtype, device)

    def pack_linear_weights(self) -> None:
        """Add oneDNN-packed copies of every matmul weight (CPU; see ``ParallelLinear.pack``)."""
        for module in self.modules():
            if isinstance(module, ParallelLinear):
                module.pack()
        self.lm_head.pack()

    def attention_layers(self) -> list[PagedAttention]:
        """Each decoder layer's attention module, in order (the runner attaches KV caches)."""
        return [layer.self_attn.attn for layer in self.model.layers if isinstance(layer, LlamaDecoderLayer)]

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        cos, sin = self.rotary.lookup(positions)
        return self.model(token_ids, cos, sin, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
