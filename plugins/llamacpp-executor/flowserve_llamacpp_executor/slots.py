"""Which llama.cpp sequence holds which FlowServe sequence's KV, and which tokens it holds.

llama.cpp names a sequence by a small integer (below the context's ``n_seq_max``); FlowServe
by a task id. A slot is such an integer with the tokens whose KV it holds (positions
``0 … len(tokens) - 1``, nothing else).

Prefix caching: FlowServe's KV manager may tell the executor that a new sequence's first
``start_pos`` tokens are already computed (its hash-chained blocks matched). In llama.cpp the
KV is not in blocks but in sequences, so the executor keeps the slots of finished sequences
as *retained* (least recently used first) and gives a new sequence the longest prefix any
slot holds, by ``llama_memory_seq_cp`` (cells are shared, not copied). What no slot holds is
recomputed in the same step: a missed prefix costs time, never a wrong answer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class Slot:
    """One llama.cpp sequence id and the tokens whose KV it holds."""

    __slots__ = ("seq_id", "tokens")

    def __init__(self, seq_id: int):
        self.seq_id = seq_id
        self.tokens: list[int] = []


class SlotTable:
    """Slots of live sequences (by FlowServe id) and retained ones (LRU), and the free ids."""

    def __init__(self, n_slots: int):
        self.free: list[int] = list(range(n_slots - 1, -1, -1))
        self.live: dict[str, Slot] = {}
        self.retained: OrderedDict[int, Slot] = OrderedDict()

    def get(self, seq_id: str) -> Slot | None:
        return self.live.get(seq_id)

    def open(self, seq_id: str) -> tuple[Slot, list[int]]:
        """A slot for new sequence ``seq_id``, and the ids of retained slots evicted to free
        one (their KV must be removed before the slot's next use)."""
        evicted: list[int] = []
        if not self.free:
            victim = self.evict()
            if victim is None:
                raise RuntimeError("every llama.cpp sequence id is taken by a running sequence")
            evicted.append(victim)
        slot = Slot(self.free.pop())
        self.live[seq_id] = slot
        return slot, evicted

    def close(self, seq_id: str, retain: bool) -> int | None:
        """``seq_id`` ended: keep its slot for prefix reuse (``retain``), or free it; the
        llama.cpp id whose KV must be removed now, if any."""
        slot = self.live.pop(seq_id, None)
        if slot is None:
            return None
        if retain and slot.tokens:
            self.retained[slot.seq_id] = slot
            return None
        self.free.append(slot.seq_id)
        return slot.seq_id

    def evict(self) -> int | None:
        """Free the least recently used retained slot; its llama.cpp id (KV to remove), or None."""
        if not self.retained:
            return None
        seq_id, _ = self.retained.popitem(last=False)
        self.free.append(seq_id)
        return seq_id

    def best_prefix(self, tokens: Sequence[int], exclude: Slot) -> tuple[Slot | None, int]:
        """The slot (live or retained) holding the longest prefix of ``tokens``, and its length."""
        best: Slot | None = None
        best_len = 0
        for slot in (*self.live.values(), *self.retained.values()):
            if slot is exclude or len(slot.tokens) <= best_len:
                continue
            n = common_prefix(slot.tokens, tokens)
            if n > best_len:
                best, best_len = slot, n
        if best is not None and best.seq_id in self.retained:
            self.retained.move_to_end(best.seq_id)
        return best, best_len


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of ``a`` and ``b``: slice comparisons run in C, so a
    binary search over them beats a Python loop for long prompts."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    low, high = 0, n  # a[:low] == b[:low]; a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if list(a[low:mid]) == list(b[low:mid]):
            low = mid
        else:
            high = mid
    return low
