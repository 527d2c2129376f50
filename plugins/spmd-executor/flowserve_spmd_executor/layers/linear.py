"""Linear layers sharded over the tensor-parallel group (Megatron style, as in nano-vllm).

Column-parallel layers split their output features (each rank computes a slice, no
communication); row-parallel layers split their input features and all-reduce the partial
sums. Each module has a ``weight_loader(param, source, shard_id)`` that copies only this
rank's slice of a checkpoint tensor into one of its parameters (``source`` is a
``loader.TensorSource``, which reads just that slice from the file).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flowserve_spmd_executor.distributed import TensorParallelGroup


@functools.cache
def onednn_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """True when this torch build and this CPU can pre-pack linear weights of ``dtype`` for
    oneDNN's matmul (bfloat16 needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT: an AVX2-only CPU
    refuses it, and its layers keep the plain weights)."""
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 4, dtype=dtype), None)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4, dtype=dtype), weight, None, "none", [], "")
        return bool(torch.allclose(out.float(), torch.full((2, 4), 4.0)))
    except (AttributeError, RuntimeError):
        return False


#: From this many tokens on, oneDNN with a pre-packed weight beats MKL's sgemm on CPU (by
#: 1.3–3× at 4–64 rows: MKL is slow for short, wide products); below it MKL's matrix-vector
#: path is faster, so CPU layers keep both copies of their weights.
PACKED_MIN_TOKENS = 3


def padded_rows(rows: int) -> int:
    """The row count a packed matmul of ``rows`` rows runs at: exact up to 16, then rounded
    up to a multiple of 16 (of 64 past 512).

    oneDNN builds and caches a primitive per input shape (up to 1,024 by default). A server's
    steps have every token count from 1 to ``max_num_batched_tokens``, times each layer's
    weight shape: the cache filled with thousands of shapes, grew the instance's memory by
    hundreds of MiB under load, and kept evicting and rebuilding primitives. Rounding bounds
    the shapes to about 50 per weight. The padding rows are zeros and cost at most 15 rows in
    17 or more; each output row depends only on its own input row."""
    if rows <= 16:
        return rows
    step = 16 if rows <= 512 else 64
    return -(-rows // step) * step


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` pre-packed by ``pack_weight`` (``x`` 2-D)."""
    rows = x.shape[0]
    padded = padded_rows(rows)
    if padded != rows:
        x = F.pad(x, (0, 0, 0, padded - rows))
    out = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out[:rows] if padded != rows else out


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight [out, in]`` re-laid out for oneDNN (an opaque tensor; see ``packed_linear``)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


class HeadShard:
    """Which attention heads one rank owns. Query heads are split evenly. Key/value heads are
    split evenly when there are at least as many as ranks; when there are fewer, each is
    replicated on ``world_size // num_kv_heads`` consecutive ranks (rank r holds KV head
    ``r // (world_size // num_kv_heads)``, the one its query heads attend with)."""

    def __init__(self, num_heads: int, num_kv_heads: int, rank: int, world_size: int):
        if num_heads % world_size:
            raise ValueError(f"tensor_parallel={world_size} does not divide the model's "
                             f"{num_heads} attention heads; choose a divisor of {num_heads}")
        if num_kv_heads >= world_size:
            if num_kv_heads % world_size:
                raise ValueError(f"tensor_parallel={world_size} does not divide the model's "
                                 f"{num_kv_heads} key/value heads")
            self.kv_heads = num_kv_heads // world_size
            self.kv_start = rank * self.kv_heads
        else:
            if world_size % num_kv_heads:
                raise ValueError(f"tensor_parallel={world_size} is not a multiple of the model's "
                                 f"{num_kv_heads} key/value heads, so they can be neither split "
                                 "nor replicated evenly")
            self.kv_heads = 1
            self.kv_start = rank // (world_size // num_kv_heads)
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.heads = num_heads // world_size
        self.start = rank * self.heads
        self.replicated_kv = num_kv_heads < world_size


class SourceRows:
    """Rows ``[offset, offset + rows)`` of a checkpoint tensor source, read like the source itself:
    one part of a tensor the checkpoint stores fused (Phi-3's ``qkv_proj``/``gate_up_proj``)."""

    def __init__(self, source: Any, offset: int, rows: int):
        self.source, self.offset = source, offset
        self.shape = (rows, *source.shape[1:])
        self.ndim = len(self.shape)

    def read(self, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        if dim not in (None, 0):
            raise ValueError("a fused tensor's parts are read by rows")
        if dim is None:
            start, length = 0, self.shape[0]
        elif length is None:
            length = self.shape[0] - start
        return self.source.read(0, self.offset + start, length)


class ParallelLinear(nn.Module):
    """A linear layer whose weight is this rank's shard along ``shard_dim`` (0: outputs, 1: inputs)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: TensorParallelGroup,
                 shard_dim: int | None):
        super().__init__()
        self.group = group
        self.shard_dim = shard_dim
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.packed: torch.Tensor | None = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        """Copy this rank's slice of ``source`` into ``param``."""
        dim = self.shard_dim if self.shard_dim is not None and self.shard_dim < source.ndim else None
        if dim is None:
            param.data.copy_(source.read())
            return
        size = param.shape[dim]
        param.data.copy_(source.read(dim, self.group.rank * size, size))

    def pack(self) -> None:
        """Keep a second copy of the weight pre-packed for oneDNN's CPU matmul, used from
        ``PACKED_MIN_TOKENS`` tokens on (see ``packed_linear``)."""
        self.packed = pack_weight(self.weight)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T (+ bias)`` with the faster copy of the weight for this many tokens."""
        if self.packed is not None and x.shape[0] >= PACKED_MIN_TOKENS:
            return packed_linear(x, self.packed, bias)
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class ColumnParallelLinear(ParallelLinear):
    """Output features split over the ranks; the output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: TensorParallelGroup):
        if out_features % group.world_size:
            raise ValueError(f"tensor_parallel={group.world_size} does not divide {out_features} "
                             "output features")
        super().__init__(in_features, out_features // group.world_size, bias, group, shard_dim=0)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel linears fused into one matmul (gate and up projections);
    checkpoint tensor ``shard_id`` i fills the i-th block of each rank's output."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, group: TensorParallelGroup):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, group)

    def weight_loader(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        """Copy this rank's part of output block ``shard_id``; with ``shard_id`` None, ``source``
        holds every block one after another (a checkpoint that stores them fused)."""
        if shard_id is None:
            start = 0
            for index, size in enumerate(self.output_sizes):
                self.weight_loader(param, SourceRows(source, start, size), index)
                start += size
            return
        world = self.group.world_size
        offset = sum(self.output_sizes[:shard_id]) // world
        size = self.output_sizes[shard_id] // world
        param.data.narrow(0, offset, size).copy_(source.read(0, self.group.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matmul, sharded by attention head (``HeadShard``)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 group: TensorParallelGroup):
        self.head_dim = head_dim
        self.shard = HeadShard(num_heads, num_kv_heads, group.rank, group.world_size)
        self.q_size = self.shard.heads * head_dim
        self.kv_size = self.shard.kv_heads * head_dim
        out = (self.q_size + 2 * self.kv_size) * group.world_size
        super().__init__(hidden_size, out, bias, group)

    def weight_loader(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        """Copy this rank's heads of ``shard_id`` ("q", "k" or "v"); with ``shard_id`` None,
        ``source`` is q, k and v fused in that order (Phi-3's ``qkv_proj``)."""
        hd, shard = self.head_dim, self.shard
        if shard_id is None:
            q_rows, kv_rows = shard.num_heads * hd, shard.num_kv_heads * hd
            for part, start, rows in (("q", 0, q_rows), ("k", q_rows, kv_rows), ("v", q_rows + kv_rows, kv_rows)):
                self.weight_loader(param, SourceRows(source, start, rows), part)
            return
        if shard_id == "q":
            offset, start, size = 0, shard.start * hd, self.q_size
        else:
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            start, size = shard.kv_start * hd, self.kv_size
        param.data.narrow(0, offset, size).copy_(source.read(0, start, size))


class RowParallelLinear(ParallelLinear):
    """Input features split over the ranks; partial outputs are all-reduced (the bias is
    added once, after the sum)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: TensorParallelGroup):
        if in_features % group.world_size:
            raise ValueError(f"tensor_parallel={group.world_size} does not divide {in_features} "
                             "input features")
        super().__init__(in_features // group.world_size, out_features, bias, group, shard_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group.world_size == 1:
            return self.matmul(x, self.bias)
        out = self.group.all_reduce(self.matmul(x, None))
        return out if self.bias is None else out + self.bias
