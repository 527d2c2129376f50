"""What placement reads and holds: the prefill work an instance reported waiting, the prompt
prefix that names a locality, and a decode instance reserved while a prefill runs."""

from __future__ import annotations

import collections

from flowserve_core.interfaces import Instance

#: Prompt tokens that name a prefix for locality (two blocks of the default size).
LOCALITY_TOKENS = 32


def waiting_tokens(instance: Instance) -> int:
    """Prefill tokens ``instance`` last reported as not computed yet."""
    return instance.stats.scheduler.waiting_prefill_tokens


class DecodeReservation:
    """A decode instance chosen for a request whose prefill is under way: one more task there
    for placement until the decode task is submitted (then the instance counts it itself)."""

    def __init__(self, counts: collections.Counter[str], instance: Instance):
        self.counts, self.instance, self.held = counts, instance, True
        counts[instance.info.id] += 1

    def end(self) -> None:
        """Give the reservation up (once; later calls do nothing)."""
        if self.held:
            self.held = False
            self.counts[self.instance.info.id] -= 1
            if self.counts[self.instance.info.id] <= 0:
                del self.counts[self.instance.info.id]
