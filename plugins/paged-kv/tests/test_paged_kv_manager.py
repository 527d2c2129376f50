"""Unit tests of the ``paged`` KV cache manager: allocation, prefix caching, LRU eviction,
copy-on-write after fork, hashes stable across processes, export and import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flowserve_core.types import DeploymentSpec, KVCacheSpec
from flowserve_paged_kv import PagedKVCacheManager, chain_hash

BS = 4


def manager(num_blocks: int = 8, block_size: int = BS) -> PagedKVCacheManager:
    return PagedKVCacheManager(None, KVCacheSpec(num_blocks=num_blocks, block_size=block_size))


def computed(kv: PagedKVCacheManager, seq_id: str, tokens: list[int]) -> None:
    """Allocate ``tokens`` and commit them all, as a finished prefill would."""
    assert kv.allocate(seq_id, tokens) is not None
    kv.commit(seq_id, tokens, len(tokens))


def test_built_by_name_through_the_plugin_manager(pm):
    kv = pm.build("kv_cache", "paged", DeploymentSpec(), KVCacheSpec(num_blocks=1 << 20, block_size=16))
    assert isinstance(kv, PagedKVCacheManager)
    assert kv.usage().free_blocks == 1 << 20 and kv.block_size == 16


def test_allocate_reserves_whole_blocks_and_refuses_without_side_effects():
    kv = manager(num_blocks=3)
    assert kv.allocate("a", list(range(9))) == 0  # 9 tokens: 3 blocks of 4
    assert kv.block_table("a") == [0, 1, 2]
    before = kv.usage()
    assert kv.allocate("b", [1]) is None
    assert kv.usage() == before and not kv.has_sequence("b")
    with pytest.raises(ValueError, match="already has blocks"):
        kv.allocate("a", [1])
    with pytest.raises(ValueError, match="no tokens"):
        kv.allocate("c", [])
    kv.free("a")
    assert kv.usage().free_blocks == 3
    kv.free("a")  # unknown ids are ignored


def test_prefix_hits_reuse_blocks_but_always_leave_the_last_token():
    kv = manager()
    prompt = list(range(100, 112))  # exactly 3 full blocks
    computed(kv, "a", prompt)
    # A live sequence's blocks are shared: same ids, ref count 2, nothing new for them.
    assert kv.allocate("b", prompt + [7, 8]) == 12
    assert kv.block_table("b")[:3] == kv.block_table("a")
    assert [kv.ref_count(b) for b in kv.block_table("a")] == [2, 2, 2]
    # The same prompt again: the last block must be computed so the model sees the last token.
    assert kv.allocate("c", prompt) == 8
    assert kv.block_table("c")[:2] == kv.block_table("a")[:2]
    assert kv.block_table("c")[2] != kv.block_table("a")[2]
    # A different token in block 2 stops the chain there, even though block 3 matches.
    other = prompt[:4] + [0] + prompt[5:] + [1]
    assert kv.allocate("d", other) == 4
    usage = kv.usage()
    assert usage.prefix_queries == 12 + 14 + 12 + 13 and usage.prefix_hits == 12 + 8 + 4


def test_freed_hashed_blocks_stay_cached_and_unhashed_ones_are_free():
    kv = manager()
    computed(kv, "a", list(range(10)))  # 2 full blocks (hashed) and a partial one
    kv.free("a")
    usage = kv.usage()
    assert (usage.used_blocks, usage.cached_blocks, usage.free_blocks) == (0, 2, 6)
    assert kv.num_cached_tokens(list(range(10))) == 8
    assert kv.allocate("b", list(range(10)) + [99]) == 8
    assert kv.usage().cached_blocks == 0


def test_eviction_is_least_recently_freed_first_and_tail_blocks_go_first():
    kv = manager(num_blocks=4)
    computed(kv, "old", [1, 1, 1, 1, 2, 2, 2, 2, 0])  # blocks 0, 1 hashed; 2 unhashed
    kv.free("old")
    computed(kv, "new", [5, 5, 5, 5, 0])  # takes a free block for its partial tail
    kv.free("new")
    assert kv.usage().cached_blocks == 3
    # Asking without allocating changes nothing, not even the LRU order.
    assert kv.num_cached_tokens([1, 1, 1, 1, 2, 2, 2, 2, 0]) == 8
    # Two blocks needed, one free: one eviction, the tail of the oldest freed sequence.
    assert kv.allocate("x", [9] * 8) == 0
    assert kv.num_cached_tokens([1, 1, 1, 1, 2, 2, 2, 2, 0]) == 4
    assert kv.num_cached_tokens([5, 5, 5, 5, 0]) == 4
    kv.free("x")
    assert kv.allocate("y", [8] * 16) == 0  # everything, evicting all that is cached
    assert kv.usage().cached_blocks == 0 and kv.num_cached_tokens([5, 5, 5, 5, 0]) == 0


def test_fork_shares_blocks_and_copies_on_write():
    kv = manager()
    tokens = list(range(6))  # block 0 full, block 1 holds 2 tokens
    computed(kv, "parent", tokens)
    kv.fork("parent", "child")
    shared = kv.block_table("parent")
    assert kv.block_table("child") == shared and [kv.ref_count(b) for b in shared] == [2, 2]
    # The child writes position 6, inside the shared partial block: it gets a copy.
    assert kv.append_slots("child", 7)
    child = kv.block_table("child")
    assert child[0] == shared[0] and child[1] != shared[1]
    assert kv.take_block_copies() == [(shared[1], child[1])]
    assert kv.take_block_copies() == []
    # The parent is alone in its block now: it writes in place, no copy.
    assert kv.append_slots("parent", 7)
    assert kv.block_table("parent") == shared and kv.take_block_copies() == []
    assert kv.ref_count(shared[0]) == 2 and kv.ref_count(shared[1]) == 1
    with pytest.raises(ValueError, match="already has blocks"):
        kv.fork("parent", "child")


def test_copy_on_write_needs_a_block_and_a_freed_copy_is_dropped():
    kv = manager(num_blocks=2)
    computed(kv, "parent", [1, 2, 3, 4, 5])
    kv.fork("parent", "child")
    computed_usage = kv.usage()
    assert computed_usage.free_blocks == 0
    assert not kv.append_slots("child", 6)  # no block for the copy
    assert kv.usage() == computed_usage and kv.take_block_copies() == []
    kv.free("parent")
    assert kv.append_slots("child", 6)  # alone now: writes in place
    assert kv.take_block_copies() == []

    kv = manager(num_blocks=4)
    computed(kv, "parent", [1, 2, 3, 4, 5])
    kv.fork("parent", "child")
    assert kv.append_slots("child", 6)
    kv.free("child")  # aborted before the step ran: its copy is moot
    assert kv.take_block_copies() == []


def test_append_slots_refuses_without_side_effects():
    kv = manager(num_blocks=2)
    kv.allocate("a", [1, 2, 3])
    assert kv.append_slots("a", 8)
    assert not kv.append_slots("a", 9)
    assert kv.block_table("a") == [0, 1]
    with pytest.raises(KeyError, match="no sequence 'zz'"):
        kv.append_slots("zz", 1)


def test_commit_checks_what_it_is_told():
    kv = manager()
    kv.allocate("a", [1, 2, 3])
    with pytest.raises(ValueError, match="only 4 slots reserved"):
        kv.commit("a", list(range(9)), 9)
    with pytest.raises(ValueError, match="only 3 token ids"):
        kv.commit("a", [1, 2, 3], 4)


def test_a_hash_collision_is_a_miss_not_wrong_kv():
    kv = manager()
    computed(kv, "a", [1, 2, 3, 4, 0])
    block = kv.block_table("a")[0]
    block_hash = chain_hash(None, [1, 2, 3, 4])
    assert kv.pool.lookup(block_hash, None, (1, 2, 3, 4)) == block
    assert kv.pool.lookup(block_hash, None, (4, 3, 2, 1)) is None  # same hash, other tokens
    assert kv.pool.lookup(block_hash, 5, (1, 2, 3, 4)) is None  # same tokens, other parent


def test_block_hashes_are_chained_and_the_same_in_every_process():
    kv = manager()
    tokens = list(range(40, 58))  # 4 full blocks and 2 tokens
    hashes = kv.block_hashes(tokens)
    assert len(hashes) == 4 and len(set(hashes)) == 4
    assert kv.block_hashes([0] + tokens[1:])[1:] != hashes[1:]  # every later hash changes
    assert all(-(1 << 63) <= h < (1 << 63) for h in hashes)  # int64, as msgspec/torch carry
    script = ("from flowserve_paged_kv import full_block_hashes; "
              f"print(full_block_hashes({tokens!r}, {BS}))")
    for seed in ("0", "12345"):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        assert out.strip() == str(hashes)


def test_export_then_import_moves_only_blocks_the_receiver_lacks():
    sender, receiver = manager(), manager()
    prompt = list(range(200, 214))  # 3 full blocks + 2 tokens
    computed(sender, "p", prompt)
    ids, hashes = sender.export_blocks("p")
    assert ids == sender.block_table("p")[:3] and hashes == sender.block_hashes(prompt)
    ids, _ = sender.export_blocks("p", include_partial=True)
    assert ids == sender.block_table("p")

    computed(receiver, "earlier", prompt[:8] + [0])  # the receiver has the first two blocks
    needs = receiver.import_blocks("d", prompt, hashes)
    table = receiver.block_table("d")
    assert table[:2] == receiver.block_table("earlier")[:2]
    assert needs == [(2, table[2]), (3, table[3])]
    assert receiver.num_computed("d") == len(prompt)
    # Once the data is written, commit makes the new full block reusable.
    assert receiver.num_cached_tokens(prompt + [1]) == 8
    receiver.commit("d", prompt, len(prompt))
    assert receiver.num_cached_tokens(prompt + [1]) == 12
    assert receiver.export_blocks("d")[1] == hashes


def test_import_refuses_mismatched_hashes_and_lack_of_blocks():
    kv = manager(num_blocks=2)
    with pytest.raises(ValueError, match="do not match"):
        kv.import_blocks("d", list(range(8)), [123])
    assert kv.import_blocks("d", list(range(12)), []) is None
    assert kv.usage().free_blocks == 2


def test_blocks_behind_every_window_are_given_back_once_and_stay_cached():
    """With sliding_window 8 and blocks of 4, the next query after 20 computed tokens (position
    20) reads keys 13.. on: blocks 0-2 (positions 0-11) are never read again."""
    kv = PagedKVCacheManager(None, KVCacheSpec(num_blocks=12, block_size=BS, sliding_window=8))
    tokens = list(range(100, 120))
    computed(kv, "a", tokens)
    table = kv.block_table("a")
    assert kv.release_out_of_window("a") == 3 and kv.release_out_of_window("a") == 0
    assert [kv.ref_count(b) for b in table] == [0, 0, 0, 1, 1]
    usage = kv.usage()
    assert usage.used_blocks == 2 and usage.cached_blocks == 3  # hashed: a later prompt may reuse them
    assert kv.block_table("a") == table  # the ids stay (attention masks them out)
    kv.fork("a", "b")  # a child shares only what its parent still holds
    assert [kv.ref_count(b) for b in table] == [0, 0, 0, 2, 2]
    kv.free("a")
    kv.free("b")  # nothing is given back twice
    usage = kv.usage()
    assert usage.used_blocks == 0 and usage.used_blocks + usage.cached_blocks + usage.free_blocks == 12
    assert kv.allocate("c", tokens + [1]) == 20  # the released blocks were still cached, intact


def test_without_a_window_nothing_is_given_back_and_a_released_sequence_cannot_be_exported():
    kv = manager(num_blocks=8)
    computed(kv, "a", list(range(16)))
    assert kv.release_out_of_window("a") == 0 and kv.usage().used_blocks == 4
    windowed = PagedKVCacheManager(None, KVCacheSpec(num_blocks=8, block_size=BS, sliding_window=4))
    computed(windowed, "a", list(range(16)))
    assert windowed.release_out_of_window("a") == 3
    with pytest.raises(ValueError, match="cannot be exported"):
        windowed.export_blocks("a")
