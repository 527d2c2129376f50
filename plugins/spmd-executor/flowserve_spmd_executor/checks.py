"""What must hold for an instance of executor ``spmd`` to start, checked without weights.

``SpmdExecutor`` runs ``plan_kv_cache`` at every instance start; ``check_deployment`` runs the
same checks once when a deployment starts (the ``flowserve_check_deployment`` hook), from
``config.json`` or a GGUF file's header alone, so a configuration that can never work fails
at once with its reason instead of respawning instances forever: the device and dtype
exist, the model exists and parses, ``tensor_parallel`` divides its heads and MLP, ``decode_steps``
is 1 (this executor samples one token a step), and the KV
cache holds one sequence of ``max_model_len`` tokens (when it is set; unset, it becomes the
model's context or what the cache holds, whichever is less).
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowserve_core.config import parse_memory_size
from flowserve_core.errors import ConfigError
from flowserve_core.interfaces import PluginLookup
from flowserve_core.types import DeploymentSpec
from flowserve_spmd_executor.kv_cache import bytes_per_block, plan_num_blocks
from flowserve_spmd_executor.layers.linear import HeadShard
from flowserve_spmd_executor.loader import _DONE_MARKER, gguf_cache_dir, resolve_weights
from flowserve_spmd_executor.model_config import ModelConfig, load_model_config, model_config_from_dict
from flowserve_spmd_executor.options import resolve_device_type, resolve_dtype


class KVPlan:
    """An instance's KV cache: blocks per rank, their size, and the context they serve."""

    def __init__(self, kv_heads: int, bytes_per_block: int, num_blocks: int, max_model_len: int):
        self.kv_heads, self.bytes_per_block = kv_heads, bytes_per_block
        self.num_blocks, self.max_model_len = num_blocks, max_model_len


def plan_kv_cache(spec: DeploymentSpec, config: ModelConfig, dtype: torch.dtype) -> KVPlan:
    """Shard the heads over ``spec.tensor_parallel`` ranks and size the KV cache; ``ConfigError``
    when the ranks cannot split the model or the cache cannot hold one max-length sequence."""
    world = spec.tensor_parallel
    try:
        shard = HeadShard(config.num_heads, config.num_kv_heads, 0, world)
        for what, size in config.tp_split_sizes.items():
            if size % world:
                raise ValueError(f"tensor_parallel={world} does not divide the model's {what} {size}")
    except ValueError as exc:
        raise ConfigError(f"model {spec.model!r}: {exc}") from None
    per_block = bytes_per_block(config, shard.kv_heads, spec.block_size, dtype)
    memory = parse_memory_size(spec.kv_cache_memory)
    num_blocks = plan_num_blocks(memory, per_block, what=repr(spec.kv_cache_memory))
    capacity = num_blocks * spec.block_size
    if spec.max_model_len and capacity < spec.max_model_len:
        needed = -(-spec.max_model_len // spec.block_size) * per_block
        raise ConfigError(
            f"kv_cache_memory {spec.kv_cache_memory!r} holds {capacity} tokens of model {spec.model!r} "
            f"({str(dtype).removeprefix('torch.')}), fewer than one sequence of max_model_len "
            f"{spec.max_model_len}: give at least {needed / 2**20:.1f}MiB, or a smaller max_model_len")
    # Unset, max_model_len is the model's context, capped to what the cache holds (vLLM refuses
    # such a cache; a small one still serves shorter requests, which tests and laptops rely on).
    max_model_len = spec.max_model_len or min(config.max_position_embeddings, capacity)
    return KVPlan(shard.kv_heads, per_block, num_blocks, max_model_len)


def model_config_of(model: str, plugins: PluginLookup | None = None) -> ModelConfig:
    """The model's config without loading (or, for GGUF, converting) its weights."""
    path = Path(model).expanduser()
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() and not (path / "config.json").exists() else []
    gguf = path if path.is_file() and path.suffix.lower() == ".gguf" else (ggufs[0] if len(ggufs) == 1 else None)
    if gguf is None:
        return load_model_config(resolve_weights(model).directory, plugins)
    converted = gguf_cache_dir(gguf)
    if (converted / _DONE_MARKER).exists():
        return load_model_config(converted, plugins)
    from flowserve_spmd_executor.gguf_header import config_from_gguf

    return model_config_from_dict(config_from_gguf(gguf), source=str(gguf), plugins=plugins)


def check_decode_steps(spec: DeploymentSpec) -> None:
    """``ConfigError`` for multi-step decoding: this executor samples one token a step."""
    if spec.decode_steps > 1:
        raise ConfigError(f"decode_steps={spec.decode_steps}: executor 'spmd' samples one token a step; "
                          f"multi-step decoding needs executor 'llamacpp' (or decode_steps 1)")


def check_deployment(spec: DeploymentSpec, plugins: PluginLookup | None = None) -> None:
    """Raise ``ConfigError`` if no instance of ``spec`` could ever start (see the module doc)."""
    check_decode_steps(spec)
    dtype = resolve_dtype(spec.dtype, resolve_device_type(spec.device))
    plan_kv_cache(spec, model_config_of(spec.model, plugins), dtype)
