"""The hash chain that names full KV blocks by everything before them.

A full block's hash is ``H(previous block's hash, this block's token ids)``, so one hash
stands for the whole prefix up to the end of its block: two sequences with equal hashes at
block ``i`` have identical tokens ``0 .. (i+1)*block_size - 1`` and therefore identical KV.

Why blake2b and not Python's ``hash``: the hashes cross processes and hosts (a PD decode
instance skips the blocks it already holds under the sender's hashes), so they must be the
same everywhere. ``hash()`` of a str is salted per process; ``hash()`` of a tuple of ints
happens to be stable, but it is a CPython implementation detail that differs between 32- and
64-bit builds and may change between versions. blake2b is specified, in the standard library
(C speed), and a 64-bit digest fits the signed int64 that msgspec, numpy and torch all carry
without loss. A 64-bit hash can collide, so the cache also keeps each block's tokens and its
parent hash and checks them on every hit (``BlockPool.lookup``): a collision costs a cache
miss, never wrong KV.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Sequence

#: blake2b's personalisation: hashes from another scheme can never equal ours by design.
_PERSON = b"flowserve-kv-v1"


def chain_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """The hash of a block holding ``tokens`` after the block hashed ``parent`` (None: first block).

    Tokens are packed as little-endian int64, so the value is the same on every host.
    """
    digest = hashlib.blake2b(digest_size=8, person=_PERSON)
    if parent is not None:
        digest.update(parent.to_bytes(8, "little", signed=True))
    digest.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return int.from_bytes(digest.digest(), "little", signed=True)


def full_block_hashes(token_ids: Sequence[int], block_size: int, limit: int | None = None) -> list[int]:
    """The chained hashes of the full blocks of ``token_ids`` (at most ``limit`` of them)."""
    count = len(token_ids) // block_size
    if limit is not None:
        count = min(count, limit)
    hashes: list[int] = []
    parent = None
    for index in range(count):
        parent = chain_hash(parent, token_ids[index * block_size:(index + 1) * block_size])
        hashes.append(parent)
    return hashes
