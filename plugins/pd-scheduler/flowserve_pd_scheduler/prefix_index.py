"""Which prompt blocks each decode instance holds, as far as the job scheduler can tell.

The decode instance of a request is chosen before its prefill runs, so that the prefill
exports only the blocks that instance lacks (``KVHandoff.first_block``). An instance cannot
be asked about its cache without a round trip the kernel does not have, but every block a
decode instance caches came through this job scheduler: the prompts of the decode tasks it
placed there (imported or recomputed) and the tokens they generated. So the index keeps, per
decode instance, the chained hashes of those full blocks, least recently used first and no
more than the instance's KV blocks — as SGLang's cache-aware router keeps an approximate
radix tree per worker from the requests it routed.

The index can be wrong both ways, and neither costs correctness. An instance may hold more
than the index says (entries the index dropped first, as its LRU order is only close to the
cache's): the handoff then carries blocks the decode side skips. It may hold less (its cache evicted blocks, or another policy's KV
cache manager keeps no prefixes): the decode side sees that its cache lacks blocks before
the handoff's ``first_block`` and recomputes the prompt; its first event reports what its
cache held (``num_cached_tokens``), and ``missed`` counts such requests.
"""

from __future__ import annotations

import collections
from typing import Sequence

#: Entries kept per instance when it has not reported its KV size yet.
DEFAULT_CAPACITY = 1 << 16


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids``: one hash names a whole prefix.
    (Python's ``hash`` of int tuples: the index lives in one process.)"""
    hashes: list[int] = []
    parent = 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start:start + block_size])))
        hashes.append(parent)
    return hashes


class DecodePrefixIndex:
    """Per decode instance: the chained hashes of full blocks it likely holds (LRU)."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._held: dict[str, collections.OrderedDict[int, None]] = {}
        self.missed = 0

    def hashes(self, token_ids: Sequence[int]) -> list[int]:
        return block_hashes(token_ids, self.block_size)

    def held(self, instance_id: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` the instance holds (a hash names its whole
        prefix, so the first miss ends the run)."""
        held = self._held.get(instance_id)
        if not held:
            return 0
        count = 0
        for block_hash in hashes:
            if block_hash not in held:
                break
            count += 1
        return count

    def add(self, instance_id: str, hashes: Sequence[int], capacity: int = 0) -> None:
        """The instance holds these blocks now (most recently used); the oldest entries go
        beyond ``capacity`` (its KV blocks; ``DEFAULT_CAPACITY`` when unknown)."""
        held = self._held.setdefault(instance_id, collections.OrderedDict())
        for block_hash in hashes:
            held[block_hash] = None
            held.move_to_end(block_hash)
        limit = capacity if capacity > 0 else DEFAULT_CAPACITY
        while len(held) > limit:
            held.popitem(last=False)

    def keep(self, instance_ids: set[str]) -> None:
        """Forget instances that are gone (a replacement starts with an empty cache)."""
        for instance_id in [i for i in self._held if i not in instance_ids]:
            del self._held[instance_id]
