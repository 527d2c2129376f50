"""Attention over the paged KV cache, for a flat batch of decode tokens and prefill chunks.

Every layer first writes the step's new keys and values into their cache slots
(``slot = block_table[pos // block_size] * block_size + pos % block_size``), then attends:

- **decode** sequences (one new token each) together: their blocks are gathered into a
  padded ``[D, kv_heads, L, head_dim]`` view and the query heads of each KV head are laid out
  as the query "positions" of one SDPA call (``[D, kv_heads, group, head_dim]``), so grouped
  query attention needs no copy of K/V per query head; a key-padding mask hides slots past
  each sequence's length.
- **prefill** chunks (several tokens, possibly after cached context: earlier chunks or prefix
  cache hits) together: padded to the longest chunk, with a mask that is causal over the
  absolute positions and hides padding.

Everything that depends only on the step (slots, padded block tables, masks, index maps) is
built once per step in ``AttentionMetadata`` and shared by all layers. Flat tokens are
ordered decode tokens first, then the prefill chunks one after another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class GatherWorkspace:
    """Memory for gathered KV blocks, kept across layers and steps (grown when needed)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self._buffer = torch.empty(0, dtype=dtype, device=device)

    def take(self, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
        """Contiguous, non-overlapping tensors of ``shapes`` (valid until the next ``take``)."""
        sizes = [int(torch.Size(shape).numel()) for shape in shapes]
        if sum(sizes) > self._buffer.numel():
            self._buffer = torch.empty(sum(sizes), dtype=self._buffer.dtype, device=self._buffer.device)
        out, offset = [], 0
        for shape, size in zip(shapes, sizes):
            out.append(self._buffer[offset:offset + size].view(shape))
            offset += size
        return out


@dataclass
class AttentionMetadata:
    """One step's attention layout, shared by every layer."""

    slot_mapping: torch.Tensor
    num_decode: int = 0
    decode_block_tables: torch.Tensor | None = None
    #: sliding window (0 = none) → key mask ``[D, 1, 1, L]``, or None when every gathered key
    #: up to ``decode_key_len`` is visible (one sequence: SDPA's unmasked kernel is faster)
    decode_masks: dict[int, torch.Tensor | None] = field(default_factory=dict)
    decode_key_len: int | None = None
    num_prefill: int = 0
    prefill_max_len: int = 0
    prefill_gather: torch.Tensor | None = None
    prefill_unpad: torch.Tensor | None = None
    prefill_block_tables: torch.Tensor | None = None
    #: sliding window → mask ``[P, 1, group * max_len, L]``
    prefill_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    #: where decode (then prefill) blocks are gathered: K and V ``[blocks, block_size, kv, hd]``
    decode_buffers: list[torch.Tensor] = field(default_factory=list)
    prefill_buffers: list[torch.Tensor] = field(default_factory=list)


def _padded_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=device)


def build_attention_metadata(*, slot_mapping: list[int], query_lens: list[int], context_lens: list[int],
                             block_tables: list[list[int]], num_decode: int, block_size: int,
                             group_size: int, windows: set[int], device: torch.device,
                             workspace: GatherWorkspace | None = None,
                             block_shape: tuple[int, ...] = ()) -> AttentionMetadata:
    """Build the step's metadata. Sequences ``[0, num_decode)`` have one query token each;
    the rest are prefill chunks. ``context_lens`` count cached plus new tokens. With a
    ``workspace``, gather buffers for blocks of ``block_shape`` (block_size, kv_heads,
    head_dim) are taken from it."""
    meta = AttentionMetadata(slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device))
    if num_decode:
        meta.num_decode = num_decode
        tables = block_tables[:num_decode]
        meta.decode_block_tables = _padded_tables(tables, device)
        keys = torch.arange(meta.decode_block_tables.shape[1] * block_size, device=device)
        ctx = torch.tensor(context_lens[:num_decode], device=device)
        visible = keys[None, :] < ctx[:, None]
        for window in windows:
            if num_decode == 1 and (not window or context_lens[0] <= window):
                meta.decode_masks[window], meta.decode_key_len = None, context_lens[0]
                continue
            mask = visible if not window else visible & (keys[None, :] > (ctx - 1 - window)[:, None])
            meta.decode_masks[window] = mask.view(num_decode, 1, 1, -1)
    if len(query_lens) > num_decode:
        lens = query_lens[num_decode:]
        num, longest = len(lens), max(lens)
        meta.num_prefill, meta.prefill_max_len = num, longest
        q_lens = torch.tensor(lens, device=device)
        offsets = torch.cumsum(q_lens, 0) - q_lens
        steps = torch.arange(longest, device=device)
        # Padding rows repeat the chunk's last token (query and mask), so no row is fully
        # masked (SDPA would give NaN) and their ignored output stays finite.
        clamped = torch.minimum(steps[None, :], (q_lens - 1)[:, None])
        meta.prefill_gather = (offsets[:, None] + clamped).view(-1)
        rows = torch.arange(num, device=device)[:, None] * longest + steps[None, :]
        meta.prefill_unpad = rows[steps[None, :] < q_lens[:, None]]
        meta.prefill_block_tables = _padded_tables(block_tables[num_decode:], device)
        keys = torch.arange(meta.prefill_block_tables.shape[1] * block_size, device=device)
        ctx = torch.tensor(context_lens[num_decode:], device=device)
        q_pos = (ctx - q_lens)[:, None] + clamped
        visible = (keys[None, None, :] <= q_pos[:, :, None]) & (keys[None, None, :] < ctx[:, None, None])
        for window in windows:
            mask = visible if not window else visible & (keys[None, None, :] > (q_pos - window)[:, :, None])
            meta.prefill_masks[window] = mask.unsqueeze(1).repeat(1, 1, group_size, 1)
    if workspace is not None:
        shapes = []
        for table in (meta.decode_block_tables, meta.prefill_block_tables):
            if table is not None:
                shapes += [(table.numel(), *block_shape)] * 2
        buffers = workspace.take(*shapes)
        if meta.decode_block_tables is not None:
            meta.decode_buffers, buffers = buffers[:2], buffers[2:]
        meta.prefill_buffers = buffers
    return meta


class PagedAttention(nn.Module):
    """Scaled dot-product attention of one layer over its KV cache blocks.

    ``k_cache``/``v_cache`` are this layer's ``[num_blocks, block_size, kv_heads, head_dim]``
    views of the executor's KV tensor, attached by the runner once allocated.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int = 0,
                 scale: float | None = None, softcap: float | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.sliding_window = sliding_window
        #: Gemma 2's ``cap * tanh(scores / cap)`` before the softmax (SDPA cannot, so such
        #: layers take ``_softcapped_attention``)
        self.softcap = softcap
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def _gather(self, cache: torch.Tensor, tables: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        num, width = tables.shape
        if out is None:
            blocks = cache.index_select(0, tables.view(-1))
        else:
            blocks = torch.index_select(cache, 0, tables.view(-1), out=out)
        return blocks.view(num, width * cache.shape[1], self.num_kv_heads, self.head_dim).transpose(1, 2)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of ``q`` over ``k``/``v`` where boolean ``mask`` (None: everywhere) allows."""
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, v)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """``q [T, heads, hd]``, ``k``/``v [T, kv_heads, hd]`` → ``[T, heads * hd]``."""
        kvh, hd, group = self.num_kv_heads, self.head_dim, self.group
        k_cache, v_cache = self.k_cache, self.v_cache
        assert k_cache is not None and v_cache is not None, "the KV cache is not attached"
        k_cache.view(-1, kvh, hd).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, kvh, hd).index_copy_(0, meta.slot_mapping, v)
        outputs = []
        num_decode = meta.num_decode
        if num_decode:
            tables = meta.decode_block_tables
            buffers: Sequence[torch.Tensor | None] = meta.decode_buffers or [None, None]
            assert tables is not None  # set whenever there are decode rows
            mask = meta.decode_masks[self.sliding_window]
            keys, values = self._gather(k_cache, tables, buffers[0]), self._gather(v_cache, tables, buffers[1])
            if mask is None:
                keys, values = keys[:, :, :meta.decode_key_len], values[:, :, :meta.decode_key_len]
            out = self._attend(q[:num_decode].view(num_decode, kvh, group, hd), keys, values, mask)
            outputs.append(out.reshape(num_decode, -1))
        if meta.num_prefill:
            num, longest = meta.num_prefill, meta.prefill_max_len
            tables, buffers = meta.prefill_block_tables, meta.prefill_buffers or [None, None]
            gather, unpad = meta.prefill_gather, meta.prefill_unpad
            assert tables is not None and gather is not None and unpad is not None  # set with num_prefill
            qp = q[num_decode:].index_select(0, gather)
            qp = qp.view(num, longest, kvh, group, hd).permute(0, 2, 3, 1, 4).reshape(num, kvh, group * longest, hd)
            out = self._attend(qp, self._gather(k_cache, tables, buffers[0]),
                               self._gather(v_cache, tables, buffers[1]), meta.prefill_masks[self.sliding_window])
            out = out.view(num, kvh, group, longest, hd).permute(0, 3, 1, 2, 4).reshape(num * longest, -1)
            outputs.append(out.index_select(0, unpad))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
