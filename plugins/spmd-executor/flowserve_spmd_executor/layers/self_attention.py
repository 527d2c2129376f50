"""The self-attention block of decoder layers: fused QKV projection, optional q/k norm, rotary
embedding, paged attention, output projection — tensor parallel by head (``HeadShard``).

What differs between architectures are options: biases, the softmax scale, attention logit
soft-capping, the sliding window, partial rotary, and the q/k norm — per head (Qwen3, Gemma 3:
``qk_norm="head"``) or over the whole projection (OLMo 2: ``qk_norm="projection"``, whose
sum of squares spans every rank).
"""

from __future__ import annotations

import torch
from torch import nn

from flowserve_spmd_executor.distributed import TensorParallelGroup
from flowserve_spmd_executor.layers.attention import AttentionMetadata, PagedAttention
from flowserve_spmd_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from flowserve_spmd_executor.layers.norm import RMSNorm, ShardedRMSNorm
from flowserve_spmd_executor.layers.rotary import apply_rotary
from flowserve_spmd_executor.model_config import ModelConfig


class DecoderAttention(nn.Module):
    """One layer's attention. Parameter names follow HF checkpoints (``q_norm``, ``k_norm``,
    ``o_proj``) except the fused ``qkv_proj`` (see ``CausalLM.packed_modules``)."""

    def __init__(self, config: ModelConfig, layer: int, group: TensorParallelGroup, *,
                 qk_norm: str = "", norm_class: type[RMSNorm] = RMSNorm):
        super().__init__()
        hd = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, hd, config.num_heads, config.num_kv_heads,
                                          config.qkv_bias, group)
        shard = self.qkv_proj.shard
        self.o_proj = RowParallelLinear(config.num_heads * hd, config.hidden_size, config.o_bias, group)
        self.heads, self.kv_heads, self.head_dim = shard.heads, shard.kv_heads, hd
        self.rotary_dim = config.rotary_dim or hd
        self.qk_norm = qk_norm
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        if qk_norm == "head":
            self.q_norm, self.k_norm = norm_class(hd, config.rms_norm_eps), norm_class(hd, config.rms_norm_eps)
        elif qk_norm == "projection":
            copies = group.world_size // config.num_kv_heads if shard.replicated_kv else 1
            self.q_norm = ShardedRMSNorm(shard.start * hd, shard.heads * hd, config.num_heads * hd,
                                         config.rms_norm_eps, group)
            self.k_norm = ShardedRMSNorm(shard.kv_start * hd, shard.kv_heads * hd, config.num_kv_heads * hd,
                                         config.rms_norm_eps, group, copies)
        elif qk_norm:
            raise ValueError(f"qk_norm {qk_norm!r}: use 'head', 'projection' or ''")
        self.attn = PagedAttention(shard.heads, shard.kv_heads, hd, config.sliding_windows[layer],
                                   scale=config.attention_scale, softcap=config.attn_logit_softcap)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        tokens, heads, kv_heads, hd = hidden.shape[0], self.heads, self.kv_heads, self.head_dim
        qkv = self.qkv_proj(hidden)
        q_size, kv_size = heads * hd, kv_heads * hd
        if self.q_norm is None or self.k_norm is None:
            qk = qkv[:, :q_size + kv_size].view(tokens, heads + kv_heads, hd)
        elif self.qk_norm == "head":
            qk = torch.cat((self.q_norm(qkv[:, :q_size].reshape(tokens, heads, hd)),
                            self.k_norm(qkv[:, q_size:q_size + kv_size].reshape(tokens, kv_heads, hd))), dim=1)
        else:
            qk = torch.cat((self.q_norm(qkv[:, :q_size]), self.k_norm(qkv[:, q_size:q_size + kv_size])),
                           dim=1).view(tokens, heads + kv_heads, hd)
        # Queries and keys are rotated together: one set of ops for both.
        if self.rotary_dim == hd:
            qk = apply_rotary(qk, cos, sin)
        else:
            rot = self.rotary_dim
            qk = torch.cat((apply_rotary(qk[..., :rot].contiguous(), cos, sin), qk[..., rot:]), dim=-1)
        v = qkv[:, q_size + kv_size:].view(tokens, kv_heads, hd)
        out = self.attn(qk[:, :heads], qk[:, heads:], v, meta)
        return self.o_proj(out)
