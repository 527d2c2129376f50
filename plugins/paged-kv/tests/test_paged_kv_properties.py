"""Property tests of the ``paged`` KV cache manager: random allocate / append / compute /
fork / free sequences against a simulated KV memory.

The simulation writes each computed token into the block and slot the block table names, and
applies the copy-on-write copies the manager asks for. After every operation, every live
sequence must read its own tokens back through its block table: that one check catches a
block written while shared, a wrong prefix hit, a lost copy or a block handed out twice.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from flowserve_core.types import KVCacheSpec
from flowserve_paged_kv import PagedKVCacheManager

# A tiny alphabet makes shared prefixes (and so prefix hits) common.
tokens_strategy = st.lists(st.integers(0, 2), min_size=1, max_size=12)


class KVCacheMachine(RuleBasedStateMachine):
    """A model of the scheduler's use of the manager, with the KV memory simulated."""

    def __init__(self) -> None:
        super().__init__()
        self.kv: PagedKVCacheManager | None = None
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.memory: dict[int, dict[int, int]] = {}  # block → slot → token
        self.counter = 0

    @initialize(num_blocks=st.integers(2, 24), block_size=st.sampled_from([1, 2, 4]))
    def build(self, num_blocks: int, block_size: int) -> None:
        self.kv = PagedKVCacheManager(None, KVCacheSpec(num_blocks=num_blocks, block_size=block_size))
        self.size = block_size

    # ------------------------------------------------------------------ helpers

    def _new_id(self) -> str:
        self.counter += 1
        return f"s{self.counter}"

    def _apply_copies(self) -> None:
        for source, destination in self.kv.take_block_copies():
            assert self.kv.ref_count(destination) == 1, "a copy must land in an exclusive block"
            self.memory[destination] = dict(self.memory.get(source, {}))

    def _read(self, seq_id: str, position: int) -> int | None:
        block = self.kv.block_table(seq_id)[position // self.size]
        return self.memory.get(block, {}).get(position % self.size)

    def _allocate(self, tokens: list[int]) -> tuple[str, int | None]:
        seq_id = self._new_id()
        before = self.kv.usage()
        cached = self.kv.allocate(seq_id, tokens)
        if cached is None:
            assert self.kv.usage() == before, "a refused allocate must change nothing"
            assert not self.kv.has_sequence(seq_id)
            return seq_id, None
        assert cached % self.size == 0 and 0 <= cached < len(tokens)
        self.tokens[seq_id] = list(tokens)
        self.computed[seq_id] = cached
        return seq_id, cached

    # ------------------------------------------------------------------ operations

    @rule(tokens=tokens_strategy)
    def allocate(self, tokens: list[int]) -> None:
        self._allocate(tokens)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), extra=st.lists(st.integers(0, 2), max_size=6))
    def allocate_shared_prefix(self, data: st.DataObject, extra: list[int]) -> None:
        """A new prompt starting with a live sequence's computed tokens hits its full blocks,
        and a second identical prompt gets the very same leading block ids."""
        source = data.draw(st.sampled_from(sorted(self.tokens)))
        prefix = self.tokens[source][:self.computed[source]]
        prompt = prefix + extra
        if not prompt:
            return
        expected = min(len(prefix) // self.size, (len(prompt) - 1) // self.size) * self.size
        first, cached = self._allocate(prompt)
        if cached is None:
            return
        assert cached >= expected, f"{cached} tokens hit, at least {expected} were cached"
        second, again = self._allocate(prompt)
        if again is not None:
            assert again == cached
            blocks = cached // self.size
            assert self.kv.block_table(first)[:blocks] == self.kv.block_table(second)[:blocks]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), extra=st.lists(st.integers(0, 2), min_size=1, max_size=5))
    def append(self, data: st.DataObject, extra: list[int]) -> None:
        """Sampled tokens join a sequence; it reserves slots for them."""
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        table, before = self.kv.block_table(seq_id), self.kv.usage()
        if self.kv.append_slots(seq_id, len(self.tokens[seq_id]) + len(extra)):
            self.tokens[seq_id].extend(extra)
            self._apply_copies()
        else:
            assert self.kv.block_table(seq_id) == table and self.kv.usage() == before

    @precondition(lambda self: any(self.computed[s] < len(t) for s, t in self.tokens.items()))
    @rule(data=st.data())
    def compute(self, data: st.DataObject) -> None:
        """One engine step for one sequence: make its written blocks exclusive, write, commit."""
        pending = sorted(s for s, t in self.tokens.items() if self.computed[s] < len(t))
        seq_id = data.draw(st.sampled_from(pending))
        start, tokens = self.computed[seq_id], self.tokens[seq_id]
        end = data.draw(st.integers(start + 1, len(tokens)))
        if not self.kv.append_slots(seq_id, end):
            return
        self._apply_copies()
        table = self.kv.block_table(seq_id)
        for position in range(start, end):
            block = table[position // self.size]
            assert self.kv.ref_count(block) == 1, f"block {block} written while shared"
            self.memory.setdefault(block, {})[position % self.size] = tokens[position]
        self.kv.commit(seq_id, tokens, end)
        self.computed[seq_id] = end

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self._new_id()
        self.kv.fork(parent, child)
        self.computed[child] = self.computed[parent]
        self.tokens[child] = self.tokens[parent][:self.computed[parent]]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self.kv.free(seq_id)
        del self.tokens[seq_id], self.computed[seq_id]

    # ------------------------------------------------------------------ invariants

    @invariant()
    def blocks_are_accounted_for(self) -> None:
        if self.kv is None:
            return
        usage = self.kv.usage()
        assert usage.used_blocks + usage.cached_blocks + usage.free_blocks == usage.total_blocks
        holders: dict[int, int] = {}
        for seq_id in self.tokens:
            table = self.kv.block_table(seq_id)
            assert len(set(table)) == len(table), f"{seq_id} holds a block twice: {table}"
            for block in table:
                holders[block] = holders.get(block, 0) + 1
        for block in range(usage.total_blocks):
            assert self.kv.ref_count(block) == holders.get(block, 0), f"ref count of block {block}"
        assert usage.used_blocks == len(holders)

    @invariant()
    def every_sequence_reads_its_own_tokens(self) -> None:
        for seq_id, tokens in self.tokens.items():
            assert self.kv.num_computed(seq_id) == self.computed[seq_id]
            for position in range(self.computed[seq_id]):
                assert self._read(seq_id, position) == tokens[position], \
                    f"{seq_id} position {position}: KV of another token"

    def teardown(self) -> None:
        if self.kv is None:
            return
        for seq_id in list(self.tokens):
            self.kv.free(seq_id)
        usage = self.kv.usage()
        assert usage.used_blocks == 0
        assert usage.cached_blocks + usage.free_blocks == usage.total_blocks
        assert all(self.kv.ref_count(b) == 0 for b in range(usage.total_blocks))


KVCacheMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestKVCacheProperties = KVCacheMachine.TestCase
