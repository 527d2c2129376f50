"""The executor's KV blocks as numbers: ref counts, free blocks, cached blocks, the hash index.

Every block is in exactly one of three states:

- **used**: ref count > 0 (one or more sequences' block tables hold it);
- **cached**: ref count 0 but registered under a hash, so a new sequence with the same prefix
  can take it back; evicted least-recently-freed first when free blocks run out;
- **free**: ref count 0 and no hash.

so ``used + cached + free == num_blocks`` always.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple


class BlockContent(NamedTuple):
    """What a registered block holds: its parent's hash and its own tokens (to check hits)."""

    parent: int | None
    tokens: tuple[int, ...]


class OutOfBlocks(RuntimeError):
    """No free or cached block is left; callers check ``num_available`` first."""


class BlockPool:
    """Ref counts, the free list, the LRU of cached blocks and the hash → block index.

    Blocks are handed out lazily (``_next_fresh`` marks the first never-used block), so a pool
    of a million blocks costs two flat lists, not a million objects.
    """

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"a KV cache needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.num_used = 0
        self._hash_of: list[int | None] = [None] * num_blocks
        self._content: dict[int, BlockContent] = {}
        # Several blocks may hold one hash (the same prefix computed twice at once); each
        # stays findable until it is evicted, as in vLLM's block pool.
        self._by_hash: dict[int, dict[int, None]] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()  # ref 0 and hashed, oldest first
        self._recycled: list[int] = []  # ref 0 and unhashed
        self._next_fresh = 0

    # ------------------------------------------------------------------ counts

    @property
    def num_free(self) -> int:
        return self.num_blocks - self._next_fresh + len(self._recycled)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_available(self) -> int:
        """Blocks ``acquire_new`` can hand out: free ones, then cached ones by eviction."""
        return self.num_free + len(self._cached)

    # ------------------------------------------------------------------ hashes

    def hash_of(self, block: int) -> int | None:
        return self._hash_of[block]

    def lookup(self, block_hash: int, parent: int | None, tokens: tuple[int, ...]) -> int | None:
        """The block registered under ``block_hash`` if it really holds ``tokens`` after
        ``parent`` (a 64-bit hash may collide; a collision is a miss). No side effect."""
        for block in self._by_hash.get(block_hash, ()):
            if self._content[block] == (parent, tokens):
                return block
        return None

    def register(self, block: int, block_hash: int, parent: int | None, tokens: tuple[int, ...]) -> bool:
        """Name ``block`` (full and computed) by ``block_hash``; False, and nothing changes,
        when it already has a hash."""
        if self._hash_of[block] is not None:
            return False
        self._hash_of[block] = block_hash
        self._by_hash.setdefault(block_hash, {})[block] = None
        self._content[block] = BlockContent(parent, tokens)
        return True

    def _unregister(self, block: int) -> None:
        block_hash = self._hash_of[block]
        if block_hash is not None:
            holders = self._by_hash[block_hash]
            del holders[block]
            if not holders:
                del self._by_hash[block_hash]
            del self._content[block]
            self._hash_of[block] = None

    # ------------------------------------------------------------------ ref counts

    def acquire(self, block: int) -> None:
        """One more reference to ``block`` (a prefix hit or a fork); a cached block is used again."""
        if self.ref_counts[block] == 0:
            if block not in self._cached:
                raise ValueError(f"block {block} is free; only used or cached blocks can be shared")
            del self._cached[block]
            self.num_used += 1
        self.ref_counts[block] += 1

    def acquire_new(self) -> int:
        """A block with no content for one owner: a free one, else the least recently cached."""
        if self._recycled:
            block = self._recycled.pop()
        elif self._next_fresh < self.num_blocks:
            block = self._next_fresh
            self._next_fresh += 1
        elif self._cached:
            block, _ = self._cached.popitem(last=False)
            self._unregister(block)
        else:
            raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use")
        self.ref_counts[block] = 1
        self.num_used += 1
        return block

    def release(self, block: int) -> bool:
        """Drop one reference; True when that was the last (the block is cached or free now)."""
        count = self.ref_counts[block]
        if count <= 0:
            raise ValueError(f"block {block} is released more often than it was acquired")
        self.ref_counts[block] = count - 1
        if count > 1:
            return False
        self.num_used -= 1
        if self._hash_of[block] is not None:
            self._cached[block] = None  # newest end: evicted last
        else:
            self._recycled.append(block)
        return True

    def is_cached(self, block: int) -> bool:
        return block in self._cached
