"""``CausalLM``: what the runner and the loader need from a model, whatever its architecture.

A model (one file per architecture in ``models/``, or one a plugin registers) subclasses it and
has ``self.config``, ``self.model.embed_tokens`` and ``self.lm_head``; it implements
``forward(token_ids, positions, meta) → hidden [T, hidden]``. The base class gives the logits
(with Gemma's soft-capping and Granite's scaling when the config sets them), the attention
layers in order (the runner attaches KV caches), oneDNN packing, and the mapping from
checkpoint tensor names to parameters (fused ``qkv_proj``/``gate_up_proj`` and stacked experts).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from flowserve_spmd_executor.layers.attention import PagedAttention
from flowserve_spmd_executor.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from flowserve_spmd_executor.layers.linear import ParallelLinear
from flowserve_spmd_executor.model_config import ModelConfig

_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")


class CausalLM(nn.Module):
    """Base of the executor's models (see the module docstring)."""

    #: checkpoint name fragment → (fused parameter fragment, shard id)
    packed_modules: dict[str, tuple[str, Any]] = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }
    #: per-expert checkpoint projection → (stacked parameter of ``RoutedExperts``, part)
    expert_modules: dict[str, tuple[str, Any]] = {}
    #: where a multimodal checkpoint keeps its language model (→ our names), and the prefixes of
    #: its other towers, which a text-only executor skips
    text_model_prefixes: dict[str, str] = {
        "language_model.model.": "model.", "model.language_model.": "model.", "language_model.lm_head.": "lm_head."}
    skipped_prefixes: tuple[str, ...] = (
        "vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")

    config: ModelConfig
    model: Any
    lm_head: ParallelLMHead

    def tie_weights(self) -> None:
        """Share the embedding's weight with the LM head (``tie_word_embeddings``)."""
        embed: VocabParallelEmbedding = self.model.embed_tokens
        self.lm_head.weight = embed.weight

    def pack_linear_weights(self) -> None:
        """Add oneDNN-packed copies of every matmul weight (CPU; see ``ParallelLinear.pack``)."""
        for module in self.modules():
            if isinstance(module, ParallelLinear):
                module.pack()
        self.lm_head.pack()

    def attention_layers(self) -> list[PagedAttention]:
        """Each decoder layer's attention module, in order (the runner attaches KV caches)."""
        return [module for module in self.modules() if isinstance(module, PagedAttention)]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of ``hidden`` rows; Granite divides them, Gemma 2 soft-caps them."""
        logits = self.lm_head(hidden)
        config = self.config
        if config.logits_scaling != 1.0:
            logits = logits / config.logits_scaling
        if config.final_logit_softcap is not None:
            logits = torch.tanh(logits / config.final_logit_softcap) * config.final_logit_softcap
        return logits

    def checkpoint_target(self, name: str) -> tuple[str | None, Any]:
        """The parameter a checkpoint tensor fills, and its shard id (None: the whole tensor);
        ``(None, None)`` for a tensor the model does not use (a vision tower)."""
        if name.startswith(self.skipped_prefixes):
            return None, None
        for prefix, ours in self.text_model_prefixes.items():
            if name.startswith(prefix):
                name = ours + name[len(prefix):]
                break
        if self.expert_modules:
            match = _EXPERT.match(name)
            if match and match["proj"] in self.expert_modules:
                stacked, part = self.expert_modules[match["proj"]]
                return f"{match['prefix']}.{stacked}", (int(match["expert"]), part)
        for fragment, (fused, shard_id) in self.packed_modules.items():
            if f".{fragment}." in name:
                return name.replace(f".{fragment}.", f".{fused}."), shard_id
        return name, None

    def expected_shards(self) -> set[tuple[str, Any]]:
        """Every ``(parameter, shard id)`` a complete checkpoint fills."""
        shards_of: dict[str, list[Any]] = {}
        for fused, shard_id in self.packed_modules.values():
            shards_of.setdefault(fused, []).append(shard_id)
        parts_of: dict[str, list[Any]] = {}
        for stacked, part in self.expert_modules.values():
            parts_of.setdefault(stacked, []).append(part)
        expected: set[tuple[str, Any]] = set()
        for name, param in self.named_parameters():
            owner = next((f for f in shards_of if f".{f}." in name), None)
            last = name.rpartition(".")[2]
            if ".experts." in name and last in parts_of:
                expected.update((name, (e, p)) for e in range(param.shape[0]) for p in parts_of[last])
            elif owner is None:
                expected.add((name, None))
            else:
                expected.update((name, s) for s in shards_of[owner])
        return expected
