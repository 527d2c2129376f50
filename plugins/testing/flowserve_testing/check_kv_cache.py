"""Conformance suite for KV cache managers: ``check_kv_cache_manager(factory_or_name)``.

The suite keeps its own record of every sequence (its tokens, the slots it reserved, how many
are computed) and a simulated KV memory: computing a position stores its token in the block
the manager's table names, and block copies (``take_block_copies``, where the manager is a
``BlockCopySource``) are applied as an executor would. Every read of a computed position must
find its token.
"""

from __future__ import annotations

import itertools
import random
from typing import Any, Callable

from flowserve_core.interfaces import BlockCopySource
from flowserve_core.plugins import PluginManager
from flowserve_core.types import DeploymentSpec, KVCacheSpec
from flowserve_testing._suite import ConformanceError, require, resolve


def check_kv_cache_manager(kv_cache: str | Callable[..., Any], *, pm: PluginManager | None = None,
                           seed: int = 0, operations: int = 400) -> None:
    """Check that a KV cache manager keeps the ``KVCacheManager`` Protocol's promises.

    :param kv_cache: its factory ``(spec, KVCacheSpec) -> KVCacheManager`` (e.g. the class),
        or the name it is registered under.
    Rules: ``usage()`` accounts for every block (used + cached + free == total; used ==
    the blocks live sequences hold); allocation that does not fit returns None/False and
    changes nothing; a prefix hit never exceeds the prompt minus one token, equals what
    ``num_cached_tokens`` predicted and reads the right tokens; a block a sequence is about to
    write is its own (copy-on-write after ``fork``); freeing everything frees every block.
    Then ``operations`` random allocate/step/fork/free operations check the same rules.
    Raises ``ConformanceError`` naming the broken rule.
    """
    make = resolve(kv_cache, "kv_cache", pm)
    _accounting(_Book(make))
    _prefix_hits(_Book(make))
    _fork_copy_on_write(_Book(make))
    _random_operations(_Book(make), random.Random(seed), operations)


class _Seq:
    __slots__ = ("tokens", "reserved", "computed")

    def __init__(self, tokens: list[int], reserved: int, computed: int):
        self.tokens, self.reserved, self.computed = tokens, reserved, computed


class _Book:
    """One manager under test, with the suite's record of what it should hold."""

    def __init__(self, make: Callable[..., Any], num_blocks: int = 24, block_size: int = 4):
        spec = DeploymentSpec(name="conformance", model="conformance", block_size=block_size)
        self.kv = make(spec, KVCacheSpec(num_blocks=num_blocks, block_size=block_size, max_model_len=1024))
        require(self.kv.block_size == block_size, "block_size is the KVCacheSpec's",
                f"{self.kv.block_size} != {block_size}")
        self.num_blocks, self.size = num_blocks, block_size
        self.seqs: dict[str, _Seq] = {}
        self.memory: dict[int, dict[int, int]] = {}
        self._ids = itertools.count()
        self.check()

    def counts(self) -> tuple[int, int, int]:
        usage = self.kv.usage()
        return usage.used_blocks, usage.cached_blocks, usage.free_blocks

    def table(self, seq_id: str) -> list[int]:
        return list(self.kv.block_table(seq_id))

    def check(self) -> None:
        """Accounting, tables and the data of every computed position."""
        usage = self.kv.usage()
        require(usage.total_blocks == self.num_blocks, "usage().total_blocks is the KVCacheSpec's num_blocks",
                f"{usage.total_blocks} != {self.num_blocks}")
        require(min(usage.used_blocks, usage.cached_blocks, usage.free_blocks) >= 0 and
                usage.used_blocks + usage.cached_blocks + usage.free_blocks == usage.total_blocks,
                "usage(): used + cached + free == total", str(usage))
        held: set[int] = set()
        for seq_id, seq in self.seqs.items():
            table = self.table(seq_id)
            require(all(0 <= b < self.num_blocks for b in table) and len(set(table)) == len(table),
                    "a block table holds distinct block ids of this cache", f"{seq_id}: {table}")
            require(len(table) * self.size >= seq.reserved, "a block table covers the slots reserved",
                    f"{seq_id}: {len(table)} blocks for {seq.reserved} tokens")
            held.update(table)
            for position in range(seq.computed):
                found = self.memory.get(table[position // self.size], {}).get(position % self.size)
                require(found == seq.tokens[position], "a computed position reads its own token (blocks "
                        "are never overwritten while a sequence holds them; prefix hits and forks share "
                        "only blocks holding the same tokens)",
                        f"{seq_id} position {position} reads {found}, not {seq.tokens[position]}")
        require(usage.used_blocks == len(held), "usage().used_blocks counts exactly the blocks live "
                "sequences hold", f"{usage.used_blocks} used, {len(held)} held")

    def allocate(self, tokens: list[int]) -> str | None:
        seq_id = f"seq-{next(self._ids)}"
        before = self.counts()
        predicted = self.kv.num_cached_tokens(tokens)
        require(self.counts() == before, "num_cached_tokens() changes nothing")
        hits = self.kv.allocate(seq_id, tokens)
        if hits is None:
            require(self.counts() == before, "allocate() that returns None allocates nothing")
            return None
        require(0 <= hits <= len(tokens) - 1, "a prefix hit never exceeds the prompt minus one token",
                f"{hits} of {len(tokens)} tokens")
        require(hits == predicted, "allocate() finds the prefix num_cached_tokens() predicted",
                f"{hits} != {predicted}")
        self.seqs[seq_id] = _Seq(list(tokens), len(tokens), hits)
        self._check_writable(seq_id)
        self.check()
        return seq_id

    def allocated(self, tokens: list[int]) -> str:
        """``allocate`` where enough blocks are free: a None breaks the rule."""
        seq_id = self.allocate(tokens)
        if seq_id is None:
            raise ConformanceError("allocate() succeeds while enough blocks are free")
        return seq_id

    def step(self, seq_id: str, new_tokens: list[int], compute_to: int) -> bool:
        """Reserve slots for ``new_tokens`` more, then compute up to ``compute_to``, as a step does."""
        seq = self.seqs[seq_id]
        before, table = self.counts(), self.table(seq_id)
        if not self.kv.append_slots(seq_id, len(seq.tokens) + len(new_tokens)):
            require(self.counts() == before and self.table(seq_id) == table,
                    "append_slots() that returns False changes nothing")
            return False
        seq.tokens += new_tokens
        seq.reserved = max(seq.reserved, len(seq.tokens))
        self._check_writable(seq_id)
        self.compute(seq_id, compute_to)
        return True

    def _check_writable(self, seq_id: str) -> None:
        """The blocks this sequence writes next are its own; apply the copies that made them so."""
        copies = self.kv.take_block_copies() if isinstance(self.kv, BlockCopySource) else []
        for source, destination in copies:
            self.memory[destination] = dict(self.memory.get(source, {}))
        seq, table = self.seqs[seq_id], self.table(seq_id)
        mine = set(table[seq.computed // self.size:-(-seq.reserved // self.size)])
        for other_id in self.seqs.keys() - {seq_id}:
            shared = mine & set(self.table(other_id))
            require(not shared, "a block a sequence will write belongs to it alone (copy-on-write)",
                    f"{seq_id} writes blocks {sorted(shared)} that {other_id} holds")

    def compute(self, seq_id: str, upto: int) -> None:
        seq, table = self.seqs[seq_id], self.table(seq_id)
        upto = min(max(upto, seq.computed), seq.reserved)
        for position in range(seq.computed, upto):
            self.memory.setdefault(table[position // self.size], {})[position % self.size] = seq.tokens[position]
        seq.computed = upto
        self.kv.commit(seq_id, seq.tokens, upto)
        self.check()

    def fork(self, parent: str) -> str:
        child = f"seq-{next(self._ids)}"
        self.kv.fork(parent, child)
        seq = self.seqs[parent]
        self.seqs[child] = _Seq(seq.tokens[:seq.computed], seq.computed, seq.computed)
        self.check()
        return child

    def free(self, seq_id: str) -> None:
        self.kv.free(seq_id)
        del self.seqs[seq_id]
        self.check()

    def free_all(self) -> None:
        for seq_id in list(self.seqs):
            self.free(seq_id)
        self.kv.free("seq-never-allocated")  # unknown ids are ignored
        require(self.counts()[0] == 0, "when every sequence is freed, no block is used", str(self.kv.usage()))


def _accounting(book: _Book) -> None:
    a = book.allocated(list(range(1, 11)))
    require(book.counts()[0] == 3, "allocate() of 10 tokens in blocks of 4 takes 3 blocks",
            str(book.kv.usage()))
    b = book.allocated(list(range(50, 57)))
    require(not set(book.table(a)) & set(book.table(b)),
            "sequences allocated separately hold different blocks")
    free_blocks = book.num_blocks - book.counts()[0]
    require(book.allocate(list(range(100, 100 + 4 * free_blocks + 1))) is None,
            "allocate() returns None when the free blocks are too few")
    require(not book.step(a, [7] * (4 * free_blocks + 4), 0), "append_slots() returns False when out of blocks")
    require(book.step(a, [11, 12, 13], 13), "append_slots() within the free blocks succeeds")
    book.free_all()


def _prefix_hits(book: _Book) -> None:
    prompt = list(range(1, 14))
    first = book.allocated(prompt)
    book.compute(first, len(prompt))
    book.free(first)
    for tokens in (prompt[:12] + [99], prompt[:12], prompt[:8], prompt + [14, 15]):
        second = book.allocated(tokens)  # the rules are checked inside
        book.compute(second, len(tokens))
        book.free(second)
    book.free_all()


def _fork_copy_on_write(book: _Book) -> None:
    parent = book.allocated([1, 2, 3, 4, 5, 6])
    book.compute(parent, 6)
    child = book.fork(parent)
    require(book.step(child, [70], 7), "append_slots() after fork succeeds")
    require(book.step(parent, [80], 7), "append_slots() after fork succeeds")
    grandchild = book.fork(child)
    book.free(child)
    require(book.step(grandchild, [90, 91], 9), "append_slots() after fork succeeds")
    book.free_all()


def _random_operations(book: _Book, rng: random.Random, operations: int) -> None:
    """Small alphabets make shared prefixes, so hits, forks and evictions all happen."""
    for _ in range(operations):
        live = list(book.seqs)
        choice = rng.random()
        if not live or (choice < 0.3 and len(live) < 6):
            tokens = [rng.randrange(1, 4) for _ in range(rng.randrange(1, 20))]
            seq_id = book.allocate(tokens)
            if seq_id is not None:
                book.compute(seq_id, rng.randrange(book.seqs[seq_id].computed, len(tokens) + 1))
        elif choice < 0.7:
            seq_id = rng.choice(live)
            new = [rng.randrange(1, 4) for _ in range(rng.randrange(0, 6))]
            seq = book.seqs[seq_id]
            if new or seq.computed < len(seq.tokens):
                book.step(seq_id, new, rng.randrange(seq.computed + 1, len(seq.tokens) + len(new) + 1))
        elif choice < 0.8 and len(live) < 6:
            book.fork(rng.choice(live))
        else:
            book.free(rng.choice(live))
    book.free_all()
