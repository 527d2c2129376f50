"""Model architectures, one file each; ``model_class(model_type)`` picks one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowserve_spmd_executor.model_config import SUPPORTED_MODEL_TYPES

if TYPE_CHECKING:
    from flowserve_spmd_executor.models.llama import LlamaForCausalLM


def model_class(model_type: str) -> type[LlamaForCausalLM]:
    """The module class for ``model_type`` (llama, mistral and qwen2 share the Llama code)."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported")
    from flowserve_spmd_executor.models.llama import LlamaForCausalLM

    return LlamaForCausalLM
