"""This rank's KV cache: one tensor holding every layer's key and value blocks.

Layout: ``[num_layers, 2, num_blocks, block_size, kv_heads, head_dim]`` (index 0 of the
second axis is K, 1 is V), where ``kv_heads`` are the heads this rank holds. A layer's K (or
V) is a contiguous ``[num_blocks, block_size, kv_heads, head_dim]`` view: writing a token is
one row of ``[num_blocks * block_size, kv_heads, head_dim]`` (its slot), and gathering a
sequence's blocks is one ``index_select`` of whole blocks.

Exported blocks (``read_blocks``) use the same layout restricted to the blocks asked for, in
their order: ``[num_layers, 2, len(block_ids), block_size, kv_heads, head_dim]``.
"""

from __future__ import annotations

import logging
import math
import mmap

import torch

from flowserve_core.errors import ConfigError
from flowserve_spmd_executor.model_config import ModelConfig

log = logging.getLogger(__name__)


def bytes_per_block(config: ModelConfig, kv_heads: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes on one rank (all layers, K and V, ``kv_heads`` heads)."""
    element = torch.empty((), dtype=dtype).element_size()
    return config.num_layers * 2 * block_size * kv_heads * config.head_dim * element


def plan_num_blocks(memory: int, per_block: int, *, what: str) -> int:
    """How many blocks fit in ``memory`` bytes; at least one, or a ``ConfigError``."""
    blocks = memory // per_block
    if blocks < 1:
        raise ConfigError(f"kv_cache_memory {what} holds no KV block: one block of this model takes "
                          f"{per_block} bytes per rank; give at least {per_block} bytes")
    return blocks


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of zeros. On CPU its memory is an anonymous mapping, zero by definition and
    faulted in only where written: a new instance (a fork above all) does not touch its whole
    KV cache before it serves (``torch.zeros`` writes every page: 8,192 page faults for 32 MiB)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    buffer = mmap.mmap(-1, max(1, count * torch.empty((), dtype=dtype).element_size()))
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)


class KVCache:
    """The KV blocks of one rank (see the module docstring for the layout)."""

    def __init__(self, config: ModelConfig, *, num_blocks: int, block_size: int, kv_heads: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_blocks, self.block_size, self.kv_heads = num_blocks, block_size, kv_heads
        # Zeros, not empty: attention reads whole blocks, and masked slots must hold finite
        # numbers (0 × NaN would poison the softmax-weighted sum).
        self.tensor = zeroed((config.num_layers, 2, num_blocks, block_size, kv_heads, config.head_dim),
                             dtype, device)
        self.bytes_per_block = bytes_per_block(config, kv_heads, block_size, dtype)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s K and V views, ``[num_blocks, block_size, kv_heads, head_dim]`` each."""
        return self.tensor[index, 0], self.tensor[index, 1]

    def copy_blocks(self, pairs: list[tuple[int, int]] | list[list[int]]) -> None:
        """Copy blocks ``source → destination`` in every layer (sources are read before any write)."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=self.tensor.device)
        dst = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=self.tensor.device)
        self._check(src)
        self._check(dst)
        self.tensor[:, :, dst] = self.tensor[:, :, src]

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of ``block_ids``: ``[num_layers, 2, len(block_ids), block_size, kv_heads, head_dim]``."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.tensor.device)
        self._check(index)
        return self.tensor.index_select(2, index)

    def write_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        """Overwrite ``block_ids`` with ``blocks`` (the ``read_blocks`` layout)."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.tensor.device)
        self._check(index)
        self.tensor.index_copy_(2, index, blocks.to(device=self.tensor.device, dtype=self.tensor.dtype))

    def _check(self, index: torch.Tensor) -> None:
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_blocks):
            raise ValueError(f"KV block ids must be in [0, {self.num_blocks}), got "
                             f"{sorted(set(index.tolist()))[:8]}")
