"""KV cache manager ``paged``: per-sequence block tables over a ``BlockPool``.

Each sequence has a block table (block ids in order) and two counts: ``num_tokens``, the slots
reserved, and ``num_computed``, the leading tokens whose KV is in the blocks (``commit``).
The next step writes positions ``num_computed ..`` onwards, so ``append_slots`` makes every
block covering them exclusive first (copy-on-write of a block shared after ``fork``); blocks
before ``num_computed`` are only read, and may be shared freely (prefix hits, forks).
"""

from __future__ import annotations

import logging
from typing import Sequence

from flowserve_core.types import DeploymentSpec, KVCacheSpec, KVUsage
from flowserve_paged_kv.block_pool import BlockPool
from flowserve_paged_kv.hashing import chain_hash, full_block_hashes

log = logging.getLogger(__name__)


class _SequenceBlocks:
    """One sequence's block table and how far it is reserved and computed."""

    __slots__ = ("blocks", "num_tokens", "num_computed", "hashes", "released")

    def __init__(self, blocks: list[int], num_tokens: int, num_computed: int, hashes: list[int],
                 released: int = 0):
        self.blocks = blocks
        self.num_tokens = num_tokens
        self.num_computed = num_computed
        #: chained hashes of the leading full computed blocks, as far as ``commit`` got
        self.hashes = hashes
        #: leading blocks given back because no layer reads them again (sliding window); their
        #: ids stay in ``blocks`` (attention masks them out) but this sequence no longer holds them
        self.released = released


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class PagedKVCacheManager:
    """Fixed-size KV blocks with ref counts, hash-chained prefix caching and LRU eviction.

    Built by the engine with the executor's ``KVCacheSpec``; the executor owns the tensors,
    this object owns the numbers. ``prefix_queries``/``prefix_hits`` in ``usage()`` count
    tokens: prompt tokens asked for by ``allocate`` and those found cached.
    """

    def __init__(self, spec: DeploymentSpec | None, kv: KVCacheSpec):
        if kv.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {kv.block_size}")
        self.block_size = kv.block_size
        self.num_blocks = kv.num_blocks
        self.max_model_len = kv.max_model_len
        self.sliding_window = kv.sliding_window
        self.pool = BlockPool(kv.num_blocks)
        self._seqs: dict[str, _SequenceBlocks] = {}
        self._pending_copies: list[tuple[int, int]] = []
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ------------------------------------------------------------------ lookups (no side effects)

    def _cached_prefix(self, token_ids: Sequence[int], max_blocks: int) -> tuple[list[int], list[int]]:
        """Blocks and hashes of the longest cached run of leading full blocks (≤ ``max_blocks``)."""
        size = self.block_size
        blocks: list[int] = []
        hashes: list[int] = []
        parent = None
        for index in range(max_blocks):
            tokens = tuple(token_ids[index * size:(index + 1) * size])
            block_hash = chain_hash(parent, tokens)
            block = self.pool.lookup(block_hash, parent, tokens)
            if block is None:
                break
            blocks.append(block)
            hashes.append(block_hash)
            parent = block_hash
        return blocks, hashes

    def _reusable_blocks(self, num_tokens: int) -> int:
        # The last token is always left to compute so the model produces logits for it.
        return max(0, num_tokens - 1) // self.block_size

    def num_cached_tokens(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens ``allocate(…, token_ids)`` would find cached now: whole
        blocks, never the last token. For routing; changes nothing (not even the LRU order)."""
        blocks, _ = self._cached_prefix(token_ids, self._reusable_blocks(len(token_ids)))
        return len(blocks) * self.block_size

    def block_hashes(self, token_ids: Sequence[int]) -> list[int]:
        """The chained hashes of every full block of ``token_ids``: the same in every process."""
        return full_block_hashes(token_ids, self.block_size)

    def block_table(self, seq_id: str) -> list[int]:
        """``seq_id``'s block ids, position order (a copy)."""
        return list(self._get(seq_id).blocks)

    def ref_count(self, block: int) -> int:
        """How many sequences hold ``block`` now."""
        return self.pool.ref_counts[block]

    def num_computed(self, seq_id: str) -> int:
        """How many leading tokens of ``seq_id`` are committed as computed."""
        return self._get(seq_id).num_computed

    def has_sequence(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def can_allocate(self, num_blocks: int) -> bool:
        """Whether ``num_blocks`` new blocks could be handed out now (free or by eviction)."""
        return num_blocks <= self.pool.num_available

    def usage(self) -> KVUsage:
        """Block accounting: used + cached + free == total."""
        return KVUsage(block_size=self.block_size, total_blocks=self.num_blocks,
                       used_blocks=self.pool.num_used, cached_blocks=self.pool.num_cached,
                       free_blocks=self.pool.num_free, prefix_queries=self.prefix_queries,
                       prefix_hits=self.prefix_hits)

    def _get(self, seq_id: str) -> _SequenceBlocks:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"the KV cache holds no sequence {seq_id!r}") from None

    # ------------------------------------------------------------------ allocation

    def allocate(self, seq_id: str, token_ids: Sequence[int]) -> int | None:
        """Give ``seq_id`` blocks for all of ``token_ids``, reusing cached leading blocks.

        Returns how many leading tokens are already computed (whole cached blocks, never the
        last token), or None, with nothing allocated, when too few blocks are available.
        """
        return self._allocate(seq_id, token_ids, reuse=True)

    def allocate_uncached(self, seq_id: str, token_ids: Sequence[int]) -> int | None:
        """``allocate`` without prefix-cache hits: every token is computed again (prompt
        logprobs, mean pooling), in new blocks; full ones are cached as usual once committed.
        Returns 0, or None when too few blocks are available."""
        return self._allocate(seq_id, token_ids, reuse=False)

    def _allocate(self, seq_id: str, token_ids: Sequence[int], *, reuse: bool) -> int | None:
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already has blocks; free it first")
        if not token_ids:
            raise ValueError(f"sequence {seq_id!r}: cannot allocate blocks for no tokens")
        hits, hashes = self._cached_prefix(token_ids, self._reusable_blocks(len(token_ids))) if reuse else ([], [])
        needed = _ceil_div(len(token_ids), self.block_size) - len(hits)
        # Cached (ref 0) hits leave the evictable set, so they no longer count as available.
        revived = sum(1 for block in hits if self.pool.ref_counts[block] == 0)
        if needed > self.pool.num_available - revived:
            return None
        for block in hits:
            self.pool.acquire(block)
        blocks = hits + [self.pool.acquire_new() for _ in range(needed)]
        num_cached = len(hits) * self.block_size
        self._seqs[seq_id] = _SequenceBlocks(blocks, len(token_ids), num_cached, hashes)
        self.prefix_queries += len(token_ids)
        self.prefix_hits += num_cached
        return num_cached

    def append_slots(self, seq_id: str, num_tokens: int) -> bool:
        """Make ``seq_id`` hold ``num_tokens`` tokens and make the blocks the next step writes
        (positions ``num_computed .. num_tokens-1``) its own, copying shared ones (the copies
        wait in ``take_block_copies``). False, with nothing changed, if blocks run out."""
        seq = self._get(seq_id)
        size = self.block_size
        wanted_blocks = _ceil_div(num_tokens, size)
        written = range(seq.num_computed // size, min(len(seq.blocks), wanted_blocks))
        shared = [i for i in written if self.pool.ref_counts[seq.blocks[i]] > 1]
        if max(0, wanted_blocks - len(seq.blocks)) + len(shared) > self.pool.num_available:
            return False
        for index in shared:
            source = seq.blocks[index]
            copy = self.pool.acquire_new()
            if index * size < seq.num_computed:  # it holds computed tokens worth keeping
                self._pending_copies.append((source, copy))
            self.pool.release(source)
            seq.blocks[index] = copy
        while len(seq.blocks) < wanted_blocks:
            seq.blocks.append(self.pool.acquire_new())
        seq.num_tokens = max(seq.num_tokens, num_tokens)
        return True

    def commit(self, seq_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """The first ``num_computed`` tokens of ``seq_id`` (``token_ids``) are in its blocks
        now: register the hashes of blocks that became full, so later prompts reuse them."""
        seq = self._get(seq_id)
        if num_computed > len(seq.blocks) * self.block_size:
            raise ValueError(f"sequence {seq_id!r}: {num_computed} tokens computed but only "
                             f"{len(seq.blocks) * self.block_size} slots reserved")
        if num_computed > len(token_ids):
            raise ValueError(f"sequence {seq_id!r}: {num_computed} tokens computed but only "
                             f"{len(token_ids)} token ids given")
        seq.num_computed = max(seq.num_computed, num_computed)
        size = self.block_size
        for index in range(len(seq.hashes), seq.num_computed // size):
            parent = seq.hashes[-1] if seq.hashes else None
            tokens = tuple(token_ids[index * size:(index + 1) * size])
            block_hash = chain_hash(parent, tokens)
            seq.hashes.append(block_hash)
            self.pool.register(seq.blocks[index], block_hash, parent, tokens)

    def release_out_of_window(self, seq_id: str) -> int:
        """Give back ``seq_id``'s leading blocks that no layer reads again: with every layer's
        window at most ``sliding_window``, the next query (position ``num_computed``) reads keys
        from ``num_computed - sliding_window + 1`` on. Hashed blocks stay cached (intact until
        evicted), the others become free. Returns how many blocks were given back."""
        seq = self._get(seq_id)
        if not self.sliding_window:
            return 0
        behind = max(0, seq.num_computed - self.sliding_window + 1) // self.block_size
        for block in seq.blocks[seq.released:behind]:
            self.pool.release(block)
        count = max(0, behind - seq.released)
        seq.released = max(seq.released, behind)
        return count

    def free(self, seq_id: str) -> None:
        """Return ``seq_id``'s blocks: hashed ones stay cached (tail blocks evicted first),
        the others become free. Unknown ids are ignored."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        released = [block for block in reversed(seq.blocks[seq.released:]) if self.pool.release(block)]
        if released and self._pending_copies:
            gone = set(released)  # a copy into a block nobody holds any more is pointless
            self._pending_copies = [c for c in self._pending_copies if c[1] not in gone]

    def fork(self, parent_seq_id: str, child_seq_id: str) -> None:
        """``child`` shares ``parent``'s computed blocks (ref counts); whichever of them
        writes into a shared block first gets its own copy (``append_slots``)."""
        if child_seq_id in self._seqs:
            raise ValueError(f"sequence {child_seq_id!r} already has blocks; free it first")
        parent = self._get(parent_seq_id)
        blocks = parent.blocks[:_ceil_div(parent.num_computed, self.block_size)]
        for block in blocks[parent.released:]:  # the released ones are nobody's to share
            self.pool.acquire(block)
        self._seqs[child_seq_id] = _SequenceBlocks(list(blocks), parent.num_computed,
                                                   parent.num_computed, list(parent.hashes), parent.released)

    def take_block_copies(self) -> list[tuple[int, int]]:
        """The ``(source, destination)`` copies copy-on-write asked for since the last call;
        the executor must apply them before computing the step they were made for."""
        copies, self._pending_copies = self._pending_copies, []
        return copies

    # ------------------------------------------------------------------ PD transfer (ids and hashes)

    def export_blocks(self, seq_id: str, include_partial: bool = False) -> tuple[list[int], list[int]]:
        """The block ids holding ``seq_id``'s committed full blocks, and their chained hashes.

        With ``include_partial``, the ids also end with the block holding the computed tail
        that does not fill a block (it has no hash), so ``len(ids)`` may be ``len(hashes) + 1``.
        """
        seq = self._get(seq_id)
        if seq.released:
            raise ValueError(f"sequence {seq_id!r} gave back blocks behind its sliding window; they cannot be "
                             "exported (release_out_of_window is not for sequences whose KV moves)")
        full = len(seq.hashes)
        ids = seq.blocks[:full]
        if include_partial and seq.num_computed > full * self.block_size:
            ids = seq.blocks[:full + 1]
        return list(ids), list(seq.hashes)

    def import_blocks(self, seq_id: str, token_ids: Sequence[int],
                      block_hashes: Sequence[int]) -> list[tuple[int, int]] | None:
        """Blocks for ``seq_id`` whose KV for ``token_ids`` arrives from another instance.

        Full blocks already cached here under the same hash are shared, not transferred. Returns
        ``(index in the sequence, block id)`` for each block that needs the sender's data, or
        None, with nothing allocated, when too few blocks are available. The tokens count as
        computed; call ``commit(seq_id, token_ids, len(token_ids))`` once the data is written,
        which makes the new full blocks reusable by others.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already has blocks; free it first")
        if not token_ids:
            raise ValueError(f"sequence {seq_id!r}: cannot import KV for no tokens")
        ours = self.block_hashes(token_ids)
        if list(block_hashes) != ours[:len(block_hashes)]:
            raise ValueError(
                f"sequence {seq_id!r}: the sender's block hashes do not match these tokens with "
                f"block_size {self.block_size} (different block size or hash scheme?)")
        size = self.block_size
        found: dict[int, int] = {}
        parent = None
        for index, block_hash in enumerate(ours):
            tokens = tuple(token_ids[index * size:(index + 1) * size])
            block = self.pool.lookup(block_hash, parent, tokens)
            if block is not None:
                found[index] = block
            parent = block_hash
        total = _ceil_div(len(token_ids), size)
        revived = sum(1 for block in found.values() if self.pool.ref_counts[block] == 0)
        if total - len(found) > self.pool.num_available - revived:
            return None
        for block in found.values():
            self.pool.acquire(block)
        blocks: list[int] = []
        needs_data: list[tuple[int, int]] = []
        for index in range(total):
            if index in found:
                blocks.append(found[index])
            else:
                blocks.append(self.pool.acquire_new())
                needs_data.append((index, blocks[-1]))
        leading = 0
        while leading in found:
            leading += 1
        self._seqs[seq_id] = _SequenceBlocks(blocks, len(token_ids), len(token_ids), ours[:leading])
        return needs_data
