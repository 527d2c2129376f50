"""Phi-3 and Phi-4-mini: the Llama layout, but the checkpoint stores q/k/v fused as
``qkv_proj`` and gate/up fused as ``gate_up_proj`` (the layers split them per rank when
loading), and it may rotate only part of each head (``partial_rotary_factor``). Its
``sliding_window`` applies to every layer."""

from __future__ import annotations

from typing import Any

from flowserve_spmd_executor.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3: Llama whose checkpoint tensors are already fused like our parameters."""

    #: nothing to fuse: ``qkv_proj`` and ``gate_up_proj`` load whole (shard id None)
    packed_modules: dict[str, tuple[str, Any]] = {}
