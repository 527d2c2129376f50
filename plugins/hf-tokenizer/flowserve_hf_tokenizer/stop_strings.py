"""Stop strings over streamed text: cut at the first match, never leak what a match swallows.

The trap (vLLM #3572, #3574): streaming "Hello wor" before learning that the stop string is
"world" sends text the final answer must not contain. So the matcher holds back the longest
tail of the text that is a proper prefix of some stop string until the next text decides it.

Which match wins: the one that *ends* first (the first moment a stop string is complete),
and among those the longest. That rule gives the same answer however the text is split into
deltas, so streaming and non-streaming requests agree.
"""

from __future__ import annotations

from typing import Sequence


class StopStringMatcher:
    """Feeds text deltas through a set of stop strings; see the module docstring."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False):
        if any(not s for s in stop):
            raise ValueError(f"stop strings must not be empty, got {list(stop)!r}")
        self.stop_strings = tuple(dict.fromkeys(stop))
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stopped = False
        self._held = ""
        # Every proper prefix of every stop string: the tails worth holding back.
        self._prefixes = frozenset(s[:k] for s in self.stop_strings for k in range(1, len(s)))
        self._longest_prefix = max((len(p) for p in self._prefixes), default=0)

    @property
    def held_text(self) -> str:
        """Text received but not yet released because a stop string may still begin in it."""
        return self._held

    def feed(self, text: str) -> tuple[str, bool]:
        """Release what is decided of ``held + text``; ``(text_to_emit, stopped)``.

        Once stopped, every later call returns ``("", True)``.
        """
        if self.stopped:
            return "", True
        if not text:
            return "", False
        buffer = self._held + text
        # A match cannot lie wholly in the held text (it would have matched before), and none
        # can start in released text (its start would have been held): search only the buffer.
        best: tuple[int, int] | None = None
        for stop in self.stop_strings:
            start = buffer.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best):
                best = (start + len(stop), start)
        if best is not None:
            end, start = best
            self.stopped, self._held = True, ""
            return buffer[:end] if self.include_stop_str_in_output else buffer[:start], True
        hold = self._held_tail_length(buffer)
        self._held = buffer[len(buffer) - hold:] if hold else ""
        return buffer[:len(buffer) - hold], False

    def flush(self) -> str:
        """The sequence ended for another reason: release the held text (it matched nothing)."""
        held, self._held = ("" if self.stopped else self._held), ""
        return held

    def _held_tail_length(self, buffer: str) -> int:
        for length in range(min(self._longest_prefix, len(buffer)), 0, -1):
            if buffer[-length:] in self._prefixes:
                return length
        return 0
